//! Dockvpn: the SSL VPN service instance. Remote users connect with the stock OpenVPN client
//! (UDP or TCP); Dockvpn pushes them exactly the networks behind its left side — its left subnet,
//! those configured with --left-route and those learned by DHCP option 121 (`--dhcp left`) —
//! and forwards their traffic there. The SI routes in global mode: `main` holds the default
//! via the right gateway and the left networks via the left gateway. With one leg and no
//! --right it runs one-armed: the leg is both sides.

mod metrics;
mod reception;
mod tcp;
mod udp;
mod vpn;
mod wireguard_profile;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tracing::{error, info, warn};
use vnf_core::cli::{
    execute, shutdown_signal, JsonArgs, LifecycleArgs, LogArgs, NetworkArgs, SideArgs, FIREWALL,
    ROUTING, SELECTOR_HELP, VPN,
};
use vnf_core::lease::LearnedRoute;
use vnf_core::metrics::{MetricsArgs, MetricsListener};
use vnf_core::routing::{RoutingConfig, RoutingMode};
use vnf_core::runtime::{OnExit, RuntimeConfig, SidesObserver};
use vnf_core::side::{Assignment, Side, SideSelectors, SingleLeg};
use vnf_core::{Error, Result};

use dockvpn::access::{Access, AccessTable};
use dockvpn::datapath::tun::Offload;
use dockvpn::password::Auth;
use dockvpn::refusal::Refusal;
use dockvpn::{openvpn, pki};
use openvpn::data::Cipher;
use openvpn::server::EngineConfig;
use openvpn::session::KeyDerivation;
use openvpn::tls_auth::{self, TlsAuth};
use openvpn::tls_crypt::{ControlKey, TlsCrypt};
use openvpn::wrap::ControlWrap;
use pki::{Pki, TlsCryptMode};
use vpn::Proto;
use wireguard_profile::WireguardProfileArgs;

const DEFAULT_PORT: u16 = 1194;
/// How long a handshake (the first, or a renegotiation) may take.
const HANDSHAKE_WINDOW: Duration = Duration::from_secs(60);
/// How long a replaced data key keeps working after a renegotiation starts (OpenVPN's
/// `tran-window` default), so packets in flight are not lost; no shorter than a handshake.
const TRANSITION_WINDOW: Duration = HANDSHAKE_WINDOW;

#[derive(Parser, Debug)]
#[command(
    name = "dockvpn",
    version,
    about = "Dockvpn: container-native SSL VPN VNF giving remote OpenVPN clients the networks behind its left side",
    after_help = SELECTOR_HELP
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,

    /// Where Dockvpn keeps its PKI, clients, DHCP leases and status (a volume in the image)
    #[arg(
        long,
        global = true,
        env = "DOCKVPN_STATE_DIR",
        default_value = "/var/lib/dockvpn",
        value_name = "DIR"
    )]
    state_dir: std::path::PathBuf,

    #[command(subcommand)]
    command: Command,
}

/// The VPN address pool: `run` serves it, `client add` hands out its addresses.
#[derive(Args, Debug, Clone, Copy)]
struct PoolArgs {
    /// The VPN address pool; the server takes its first address, clients the next ones
    #[arg(
        long,
        env = "DOCKVPN_POOL",
        default_value = "10.8.0.0/24",
        value_name = "CIDR",
        help_heading = VPN
    )]
    pool: Ipv4Net,
}

/// What `run` configures and `status` checks.
#[derive(Args, Debug)]
struct RoutingArgs {
    #[command(flatten)]
    network: NetworkArgs,

    #[command(flatten)]
    routes: LeftRoutes,

    /// Routing keeps the pool behind the tun (and refuses learned routes that take it).
    #[command(flatten)]
    pool: PoolArgs,
}

impl RoutingArgs {
    /// What `run` installs and `status` checks: global routing for the left routes and the
    /// pool, and one leg serving both sides when there is only one.
    fn runtime_config(&self, state_dir: &Path) -> RuntimeConfig {
        let routing = RoutingConfig {
            left_routes: self.routes.left_routes.iter().map(Ipv4Net::trunc).collect(),
            vpn_pool: Some(self.pool.pool.trunc()),
            ..RoutingConfig::new(RoutingMode::Global)
        };
        let mut config = self.network.runtime_config(routing, state_dir);
        one_leg_serves_both_sides(&mut config.selectors);
        config
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    routing: RoutingArgs,

    #[command(flatten)]
    lifecycle: LifecycleArgs,

    #[command(flatten)]
    serve: ServeArgs,

    #[command(flatten)]
    metrics: MetricsArgs,

    /// With --metrics-listen: bytes in and out per connected client (one series each)
    #[arg(long, env = "VNF_METRICS_PER_CLIENT", help_heading = vnf_core::cli::OUTPUT)]
    metrics_per_client: bool,
}

#[derive(Args, Debug, Clone)]
struct LeftRoutes {
    /// A network behind the left gateway, routed there and pushed to VPN clients; repeat
    /// the flag, or comma-separate in the env var
    #[arg(
        long = "left-route",
        env = "VNF_LEFT_ROUTES",
        value_name = "CIDR",
        value_delimiter = ',',
        help_heading = ROUTING
    )]
    left_routes: Vec<Ipv4Net>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address the OpenVPN server listens on (UDP, TCP or both, by --proto)
    #[arg(
        long,
        env = "DOCKVPN_LISTEN",
        default_value = "0.0.0.0:1194",
        value_name = "ADDR:PORT",
        help_heading = VPN
    )]
    listen: SocketAddr,

    /// Serve clients over UDP, TCP (`proto tcp-client`, for networks that pass only TCP),
    /// or both on the same port
    #[arg(
        long,
        env = "DOCKVPN_PROTO",
        value_enum,
        default_value_t = Proto::Both,
        help_heading = VPN
    )]
    proto: Proto,

    /// Data-channel ciphers in order of preference (colon-separated)
    #[arg(
        long,
        env = "DOCKVPN_DATA_CIPHERS",
        default_value = "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
        value_name = "LIST",
        value_parser = parse_ciphers,
        help_heading = VPN
    )]
    data_ciphers: CipherList,

    /// Also send clients' default route through the VPN (`redirect-gateway def1`)
    #[arg(long, env = "DOCKVPN_REDIRECT_GATEWAY", help_heading = VPN)]
    redirect_gateway: bool,

    /// When the pushed routes change (a DHCP renewal, the left side): `restart` tells connected
    /// OpenVPN clients to reconnect (spread over 5 s) and pull them; `next-connect` leaves
    /// them until they reconnect on their own. WireGuard profiles are marked stale either way
    #[arg(
        long,
        env = "DOCKVPN_ON_ROUTE_CHANGE",
        value_enum,
        default_value_t = vpn::OnRouteChange::Restart,
        help_heading = VPN
    )]
    on_route_change: vpn::OnRouteChange,

    /// Masquerade client traffic out of the left side; turn off when the left networks
    /// route the pool back to the SI
    #[arg(
        long,
        env = "DOCKVPN_MASQUERADE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL",
        help_heading = FIREWALL
    )]
    masquerade: bool,

    /// Push the left side's connected subnet to clients, besides the --left-route networks
    /// and those learned by DHCP (one-armed: the subnet of the one leg)
    #[arg(
        long,
        env = "DOCKVPN_PUSH_LEFT_SUBNET",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL",
        help_heading = VPN
    )]
    push_left_subnet: bool,

    /// Keepalive interval pushed to clients and used by the server (seconds)
    #[arg(long, default_value_t = 10, value_name = "SECS", help_heading = VPN)]
    ping: u64,

    /// A client silent this long is disconnected (seconds)
    #[arg(long, default_value_t = 60, value_name = "SECS", help_heading = VPN)]
    ping_restart: u64,

    /// Name of the tun device
    #[arg(long, default_value = "dockvpn0", value_name = "NAME", help_heading = VPN)]
    tun: String,

    /// Threads for the data path: 1 receives, opens, seals and sends on one; 2 or more
    /// receive (sockets and tun, batched) on a thread of their own beside the engines'.
    /// Default: the CPUs this container may use (its cgroup quota)
    #[arg(
        long,
        env = "DOCKVPN_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..),
        help_heading = VPN
    )]
    threads: Option<u16>,

    /// Kernel offloads on the data path: `auto` uses UDP GSO/GRO and the tun's TCP/UDP
    /// segmentation where the kernel has them; `off` moves one datagram and one packet per
    /// call (for a kernel or a path that misbehaves with them)
    #[arg(
        long,
        env = "DOCKVPN_OFFLOAD",
        value_enum,
        default_value_t = Offload::Auto,
        help_heading = VPN
    )]
    offload: Offload,

    /// Most clients connected (or connecting) at once
    #[arg(long, default_value_t = 1024, value_name = "N", help_heading = VPN)]
    max_clients: usize,

    /// Renegotiate each client's data keys after this many seconds (0: only when the client
    /// asks or a key nears its packet limit); clients renegotiate on their own reneg-sec too
    #[arg(
        long,
        env = "DOCKVPN_RENEG_SEC",
        default_value_t = 3600,
        value_name = "SECS",
        help_heading = VPN
    )]
    reneg_sec: u64,

    /// How data keys are derived: tls-ekm when the client offers it, else OpenVPN's PRF
    /// (auto; OpenVPN 2.4 and 2.5 clients need the PRF), or always one of them
    #[arg(
        long,
        env = "DOCKVPN_KEY_DERIVATION",
        default_value = "auto",
        value_name = "auto|tls-ekm|prf",
        value_parser = parse_key_derivation,
        help_heading = VPN
    )]
    key_derivation: KeyDerivationArg,

    #[command(flatten)]
    tls_crypt: TlsCryptArg,

    /// How OpenVPN clients authenticate: certificate only, or certificate and the password
    /// set with `client passwd` (profiles then carry `auth-user-pass`; the username is the
    /// client's name)
    #[arg(
        long,
        env = "DOCKVPN_AUTH",
        value_enum,
        default_value_t = Auth::Cert,
        help_heading = VPN
    )]
    auth: Auth,

    /// Address the WireGuard server listens on (UDP), or `off`; WireGuard clients share the
    /// registry, the pool, the tun and the routes with OpenVPN clients
    #[arg(
        long,
        env = "DOCKVPN_WIREGUARD_LISTEN",
        default_value = "0.0.0.0:51820",
        value_name = "ADDR:PORT|off",
        value_parser = parse_wireguard_listen,
        help_heading = VPN
    )]
    wireguard_listen: WireguardListen,
}

#[derive(Debug, Clone, Copy)]
struct WireguardListen(Option<SocketAddr>);

fn parse_wireguard_listen(text: &str) -> std::result::Result<WireguardListen, String> {
    if text == "off" {
        return Ok(WireguardListen(None));
    }
    match text.parse::<SocketAddr>() {
        Ok(address) if address.is_ipv4() => Ok(WireguardListen(Some(address))),
        _ => Err(format!(
            "{text:?} is not an IPv4 ADDR:PORT such as 0.0.0.0:51820, or off"
        )),
    }
}

/// `run` and `client config` take the same switch (and env var), so profiles match the server.
#[derive(Args, Debug, Clone, Copy)]
struct TlsCryptArg {
    /// Wrap the control channel: peers without a valid key get no answer at all. v2 gives
    /// each client its own key (and still takes the shared v1 key where the PKI has one);
    /// v1 uses one key for all. Profiles carry the key of the mode they were issued in
    /// [default: v2; for a PKI made before tls-crypt-v2, v1 if it has the v1 key, else off;
    /// `client config` follows the running server]
    #[arg(
        long,
        env = "DOCKVPN_TLS_CRYPT",
        value_name = "MODE",
        help_heading = VPN
    )]
    tls_crypt: Option<TlsCryptMode>,
}

#[derive(Debug, Clone)]
struct CipherList(Vec<Cipher>);

fn parse_ciphers(text: &str) -> std::result::Result<CipherList, String> {
    let ciphers = text
        .split(':')
        .map(|name| {
            Cipher::from_name(name).ok_or_else(|| {
                format!("unknown data cipher {name:?}; supported: AES-256-GCM, AES-128-GCM, CHACHA20-POLY1305")
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(CipherList(ciphers))
}

/// `--key-derivation`: None is auto.
#[derive(Debug, Clone, Copy)]
struct KeyDerivationArg(Option<KeyDerivation>);

fn parse_key_derivation(text: &str) -> std::result::Result<KeyDerivationArg, String> {
    match text {
        "auto" => Ok(KeyDerivationArg(None)),
        "tls-ekm" => Ok(KeyDerivationArg(Some(KeyDerivation::TlsEkm))),
        "prf" => Ok(KeyDerivationArg(Some(KeyDerivation::Prf))),
        other => Err(format!(
            "unknown key derivation {other:?}; use auto, tls-ekm or prf"
        )),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find the sides, route in global mode, and serve OpenVPN clients until SIGTERM/SIGINT.
    ///
    /// Creates the PKI on first start. Pushes to each client its fixed address, the left
    /// subnet, the --left-route networks and those learned by DHCP on the left (at connect
    /// time), and masquerades their traffic out of the left side unless --masquerade false.
    /// With one Ethernet leg and no --right, that leg serves as both sides (one-armed).
    Run(Box<RunArgs>),
    /// Show the sides, the routing, and the VPN server (clients, bytes, routes pushed);
    /// exits 1 unless routing is converged. Give it the options `run` got (the container's
    /// environment does that for a HEALTHCHECK)
    Status {
        #[command(flatten)]
        routing: RoutingArgs,
        #[command(flatten)]
        output: JsonArgs,
    },
    /// The certificate authority
    #[command(subcommand)]
    Pki(PkiCommand),
    /// VPN users: certificates, addresses and ready profiles
    #[command(subcommand)]
    Client(ClientCommand),
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Create the CA and the server certificate
    Init {
        /// Replace an existing PKI and the WireGuard server key (every profile issued so far,
        /// OpenVPN and WireGuard, stops working and must be issued again)
        #[arg(long)]
        force: bool,
    },
    /// Import a site's tls-auth key (its OpenVPN server's `tls-auth` file), so that its
    /// existing profiles connect with `run --tls-crypt tls-auth`
    ImportTlsAuth { file: std::path::PathBuf },
    /// Print the CRL (PEM), signed by the CA, listing every revoked client certificate
    Crl,
}

#[derive(Subcommand, Debug)]
enum ClientCommand {
    /// Issue a client certificate and WireGuard keys, and give it a fixed VPN address
    Add {
        name: String,
        /// A specific address in the pool [default: the next free one]
        #[arg(long)]
        address: Option<Ipv4Addr>,
        #[command(flatten)]
        pool: PoolArgs,
        /// The client's own WireGuard public key (`wg pubkey`), for a client that keeps its
        /// private key [default: a key pair generated here, which its profile carries]
        #[arg(long, value_name = "KEY")]
        wireguard_public_key: Option<String>,
        /// How long the client's certificate is valid (days)
        #[arg(long, default_value_t = pki::CLIENT_DAYS, value_name = "N")]
        days: u32,
        /// The only networks this client may reach: it is pushed only the routes inside
        /// them, and the kernel drops its traffic to anything else [default: every pushed
        /// network]
        #[arg(long, value_name = "CIDR[,CIDR…]", value_delimiter = ',')]
        allow: Option<Vec<Ipv4Net>>,
    },
    /// Limit a client to some of the pushed networks (as `client add --allow`); a running
    /// server applies it at once and tells the client, if connected, to reconnect
    Allow {
        name: String,
        #[arg(value_name = "CIDR[,CIDR…]", value_delimiter = ',', required = true)]
        networks: Vec<Ipv4Net>,
    },
    /// Print the client's ready profile: an inline .ovpn, or a wg-quick configuration
    Config {
        name: String,
        /// The profile's kind
        #[arg(long, value_enum, default_value_t = ProfileFormat::Openvpn)]
        format: ProfileFormat,
        /// What the client connects to [default: the SI's right-side address and the
        /// running server's port (WireGuard: its WireGuard port, else 51820)]
        #[arg(long, value_name = "HOST[:PORT]")]
        remote: Option<String>,
        /// Finds the right side for the default remote
        #[command(flatten)]
        sides: SideArgs,
        #[command(flatten)]
        tls_crypt: TlsCryptArg,
        /// The transports the profile connects over; `both` writes a UDP then a TCP
        /// `<connection>` block [default: what the running server serves, else udp]
        #[arg(long, value_enum)]
        proto: Option<Proto>,
        #[command(flatten)]
        wireguard: WireguardProfileArgs,
    },
    /// List the clients, their addresses and WireGuard keys, and the profiles to issue again
    List(JsonArgs),
    /// Remove a client: its certificate is revoked, it is disconnected and cannot connect
    /// again, also after a client of the same name is added
    Remove { name: String },
    /// Revoke a client's certificate and WireGuard key: it is disconnected at once and cannot
    /// connect again; it keeps its name and address for `client renew`
    Revoke { name: String },
    /// Issue a new certificate and WireGuard keys for the same name and address (hand out
    /// its profiles again); the old certificate is revoked
    Renew {
        name: String,
        /// The client's own new WireGuard public key [default: a key pair generated here]
        #[arg(long, value_name = "KEY")]
        wireguard_public_key: Option<String>,
        /// How long the new certificate is valid (days)
        #[arg(long, default_value_t = pki::CLIENT_DAYS, value_name = "N")]
        days: u32,
    },
    /// Set the client's password for `run --auth cert+password`: typed at the prompt, or
    /// one line on stdin (never on the command line)
    Passwd {
        name: String,
        /// Refused: a password on the command line shows in `ps` and the shell history
        #[arg(hide = true, allow_hyphen_values = true)]
        password: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProfileFormat {
    /// An inline .ovpn for the OpenVPN client
    Openvpn,
    /// A wg-quick configuration: its AllowedIPs are the routes the server pushes when it is
    /// printed (WireGuard has no push: issue it again when they change; `client list` says when)
    Wireguard,
}

/// `--threads`, else the CPUs this process may use (std reads the cgroup quota and the
/// affinity mask). The data path uses at most two (a receive thread and the engines').
fn data_path_threads(asked: Option<u16>) -> usize {
    let threads = asked.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    if asked.is_some_and(|asked| asked > 2) {
        info!(
            threads,
            "the data path uses 2 threads: one receives, one runs the engines"
        );
    }
    threads.min(2)
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    cli.log.init();
    execute("dockvpn", || async move {
        let pki = Pki::new(&cli.state_dir);
        match &cli.command {
            Command::Run(args) => run(&cli.state_dir, args, started).await,
            Command::Status { routing, output } => {
                status(&cli.state_dir, routing, output.json).await
            }
            Command::Pki(PkiCommand::Init { force }) => {
                if let (true, Some(running)) = (*force, read_vpn_status(&cli.state_dir)) {
                    // The server keeps its CA and key in memory: a new PKI would not reach it.
                    return Err(Error::Vnf(format!(
                        "a Dockvpn server (pid {}) runs on this state directory: stop it first, then run `dockvpn pki init --force` and start the server again",
                        running.pid
                    )));
                }
                pki.init(*force)?;
                println!("PKI created in {}", cli.state_dir.join("pki").display());
                Ok(ExitCode::SUCCESS)
            }
            Command::Pki(PkiCommand::Crl) => {
                print!("{}", pki.crl()?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Pki(PkiCommand::ImportTlsAuth { file }) => {
                pki.import_tls_auth_key(file)?;
                println!("tls-auth key imported; serve it with `dockvpn run --tls-crypt tls-auth`");
                Ok(ExitCode::SUCCESS)
            }
            Command::Client(ClientCommand::Add {
                name,
                address,
                pool,
                wireguard_public_key,
                days,
                allow,
            }) => {
                let record = pki.add(
                    name,
                    pool.pool,
                    *address,
                    wireguard_public_key.as_deref(),
                    *days,
                )?;
                if let Some(allow) = allow {
                    pki.set_allow(name, Some(allow.clone()))?;
                    warn_outside_pushed(&cli.state_dir, allow);
                }
                // A WireGuard client may handshake right away: the server knows its key first.
                reload_running_server(&cli.state_dir).await;
                println!(
                    "client {} added with address {}; `dockvpn client config {}` prints its OpenVPN profile, `--format wireguard` its WireGuard one",
                    record.name, record.address, record.name
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Client(ClientCommand::Allow { name, networks }) => {
                pki.set_allow(name, Some(networks.clone()))?;
                warn_outside_pushed(&cli.state_dir, networks);
                let listed = networks.iter().map(ToString::to_string).collect::<Vec<_>>();
                reload_running_server(&cli.state_dir).await;
                println!(
                    "client {name} may reach only {} (a running server applies it at once; WireGuard: issue its profile again)",
                    listed.join(", ")
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Client(ClientCommand::Config {
                name,
                format,
                remote,
                sides,
                tls_crypt,
                proto,
                wireguard,
            }) => {
                if *format == ProfileFormat::Openvpn {
                    if let Some(flag) = wireguard.first_given() {
                        return Err(Error::invalid(
                            flag,
                            "--format openvpn",
                            "only WireGuard profiles take it: add --format wireguard",
                        ));
                    }
                }
                // Read once: the port it last served on, and what it serves if it still runs.
                let written = load_vpn_status(&cli.state_dir);
                let port = match format {
                    ProfileFormat::Openvpn => written
                        .as_ref()
                        .map_or(DEFAULT_PORT, |status| status.listen.port()),
                    ProfileFormat::Wireguard => written
                        .as_ref()
                        .and_then(|status| status.wireguard.as_ref())
                        .map_or(wireguard_profile::DEFAULT_PORT, |serving| {
                            serving.listen.port()
                        }),
                };
                let running = written.filter(is_running);
                let (host, port) = match remote {
                    Some(remote) => parse_remote(remote, port)?,
                    None => (
                        right_address(sides, &cli.state_dir).await?.to_string(),
                        port,
                    ),
                };
                if *format == ProfileFormat::Wireguard {
                    wireguard_profile::issue(&pki, name, &host, port, running.as_ref(), wireguard)?;
                    return Ok(ExitCode::SUCCESS);
                }
                let tls_crypt = tls_crypt
                    .tls_crypt
                    .unwrap_or_else(|| profile_mode(&pki, running.as_ref()));
                let proto = proto
                    .or_else(|| running.as_ref().map(|status| status.proto))
                    .unwrap_or(Proto::Udp);
                let auth = running.as_ref().map_or(Auth::Cert, |status| status.auth);
                print!(
                    "{}",
                    pki.profile(name, (&host, port), proto, tls_crypt, auth)?
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Client(ClientCommand::List(output)) => {
                list_clients(&pki, &cli.state_dir, output.json)
            }
            Command::Client(ClientCommand::Remove { name }) => {
                pki.remove_client(name)?;
                let cut_off = cut_off_running_server(&cli.state_dir).await;
                println!("client {name} removed, its certificate revoked{cut_off}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Client(ClientCommand::Passwd { name, password }) => {
                if password.is_some() {
                    return Err(Error::invalid(
                        "PASSWORD",
                        "(not shown)",
                        format!("a password is never taken on the command line, where `ps` and the shell history show it: type it at the prompt of `dockvpn client passwd {name}`, or pipe it on stdin"),
                    ));
                }
                pki.require_client(name)?;
                pki.set_password(name, &read_password(name)?)?;
                reload_running_server(&cli.state_dir).await;
                println!("client {name}: password set; it is asked for when the server runs with --auth cert+password");
                Ok(ExitCode::SUCCESS)
            }
            Command::Client(ClientCommand::Revoke { name }) => {
                let certificate = pki.revoke_client(name)?;
                let cut_off = cut_off_running_server(&cli.state_dir).await;
                println!(
                    "client {name}: certificate {} and WireGuard key revoked{cut_off}; `dockvpn client renew {name}` issues new ones",
                    certificate.serial
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Client(ClientCommand::Renew {
                name,
                wireguard_public_key,
                days,
            }) => {
                let record = pki.renew_client(name, wireguard_public_key.as_deref(), *days)?;
                let cut_off = cut_off_running_server(&cli.state_dir).await;
                println!(
                    "client {name} renewed with address {}, the old certificate revoked{cut_off}; hand out its new profile: `dockvpn client config {name}` (`--format wireguard`)",
                    record.address
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// `client list`: each client's address and WireGuard key, and the profiles to issue again
/// (for tls-crypt-v2, or because the routes a WireGuard profile holds changed).
fn list_clients(pki: &Pki, state_dir: &Path, json: bool) -> Result<ExitCode> {
    let clients = pki.clients()?;
    let running = read_vpn_status(state_dir);
    let outdated = pki.clients_needing_new_profile(profile_mode(pki, running.as_ref()))?;
    let needs_new_profile = |name: &String| outdated.contains(name);
    let stale = wireguard_profile::stale_clients(&clients, running.as_ref());
    if json {
        let listed: Vec<serde_json::Value> = clients
            .iter()
            .map(|client| {
                let mut value = serde_json::json!(client);
                value["needs_new_profile"] = needs_new_profile(&client.name).into();
                // Unknown (null) while no server runs: the routes are the server's.
                value["wireguard_profile_stale"] = running
                    .as_ref()
                    .map(|_| stale.contains(&client.name))
                    .into();
                value
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&listed).expect("serializes")
        );
    } else if clients.is_empty() {
        println!("no clients; add one with `dockvpn client add NAME`");
    } else {
        println!("{:<24} {:<15} WIREGUARD", "NAME", "ADDRESS");
        for client in clients {
            let wireguard = match &client.wireguard {
                Some(_) => "key",
                None => "no key yet",
            };
            let mut notes = String::new();
            if client.revoked.is_some() {
                notes.push_str(&format!(
                    "  revoked: `dockvpn client renew {}` issues new credentials",
                    client.name
                ));
            }
            if let Some(allow) = &client.allow {
                let listed: Vec<String> = allow.iter().map(ToString::to_string).collect();
                notes.push_str(&format!("  allow {}", listed.join(",")));
            }
            if needs_new_profile(&client.name) {
                notes.push_str("  profile needs tls-crypt-v2: run `dockvpn client config` again");
            }
            if stale.contains(&client.name) {
                notes.push_str(&format!(
                    "  WireGuard {}: run `dockvpn client config {} --format wireguard` again",
                    wireguard_profile::STALE_NOTE,
                    client.name
                ));
            }
            println!(
                "{:<24} {:<15} {wireguard}{notes}",
                client.name, client.address
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(state_dir: &Path, args: &RunArgs, started: Instant) -> Result<ExitCode> {
    let serve = &args.serve;
    let pool = args.routing.pool.pool;
    if !serve.listen.is_ipv4() {
        return Err(Error::invalid(
            "--listen",
            serve.listen,
            "the OpenVPN server listens on IPv4: give ADDR:PORT such as 0.0.0.0:1194",
        ));
    }
    // A status file left by a run that was killed would pass for this one while it waits
    // for its DHCP lease.
    let _ = std::fs::remove_file(vpn::status_path(state_dir));
    let pki = Pki::new(state_dir);
    if pki.ensure()? {
        info!(dir = %state_dir.join("pki").display(), "PKI created");
    }
    if pool.prefix_len() > 30 {
        return Err(Error::invalid(
            "--pool",
            pool,
            "needs room for the server and at least one client: use /30 or larger",
        ));
    }
    let engine = EngineConfig {
        tls: pki.server_tls_config()?,
        pool: pool.trunc(),
        ciphers: serve.data_ciphers.0.clone(),
        ping: Duration::from_secs(serve.ping.max(1)),
        ping_restart: Duration::from_secs(serve.ping_restart.max(serve.ping + 1)),
        handshake_window: HANDSHAKE_WINDOW,
        redirect_gateway: serve.redirect_gateway,
        max_clients: serve.max_clients,
        max_handshaking: 64.min(serve.max_clients),
        reneg_after: (serve.reneg_sec > 0).then(|| Duration::from_secs(serve.reneg_sec)),
        transition_window: TRANSITION_WINDOW,
        key_derivation: serve.key_derivation.0,
        auth: serve.auth,
        tls_crypt: control_wrap(
            &pki,
            serve
                .tls_crypt
                .tls_crypt
                .unwrap_or_else(|| pki.default_tls_crypt_mode()),
        )?,
    };
    let mut runtime_config = args.routing.runtime_config(state_dir);
    args.lifecycle.apply(&mut runtime_config);
    let static_routes: BTreeSet<Ipv4Net> =
        runtime_config.routing.left_routes.iter().copied().collect();
    let (routes_tx, routes_rx) = watch::channel(static_routes.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let dhcp_sides = &runtime_config.dhcp.sides;
    let (dhcp_bound_tx, dhcp_bound_rx) = watch::channel(dhcp_sides.is_empty());
    if !dhcp_sides.is_empty() {
        let sides: Vec<&str> = dhcp_sides.iter().map(|side| side.as_str()).collect();
        info!(
            "the VPN server starts once the DHCP lease on {} is bound, so that clients get its routes",
            sides.join(" and ")
        );
    }
    let access = AccessTable::new(Access {
        tun: serve.tun.clone(),
        server_address: engine.server_address(),
        pool: engine.pool,
        left: None,
        masquerade: serve.masquerade,
        redirect_gateway: serve.redirect_gateway,
        pushed: static_routes.clone(),
        allowances: pki.allowances()?,
    });
    let mut observer = VpnObserver {
        static_routes,
        learned_routes: BTreeSet::new(),
        left_subnet: None,
        push_left_subnet: serve.push_left_subnet,
        routes: routes_tx,
        access: access.clone(),
        dhcp_bound: dhcp_bound_tx,
    };
    let wireguard = match serve.wireguard_listen.0 {
        Some(listen) => Some(vpn::WireguardConfig {
            listen,
            secret: pki.wireguard_server_secret()?,
        }),
        None => None,
    };
    let config = vpn::VpnConfig {
        listen: serve.listen,
        proto: serve.proto,
        tun_name: serve.tun.clone(),
        engine,
        state_dir: state_dir.to_path_buf(),
        wireguard,
        access,
        on_route_change: serve.on_route_change,
        threads: data_path_threads(serve.threads),
        offload: serve.offload,
    };
    let metrics_listener = MetricsListener::bind(args.metrics.metrics_listen).await?;
    let failed = std::sync::Arc::new(tokio::sync::Notify::new());
    let vpn_task = tokio::spawn({
        let failed = failed.clone();
        async move {
            let outcome = serve_once_bound(config, routes_rx, stop_rx, dhcp_bound_rx).await;
            if outcome.is_err() {
                failed.notify_one();
            }
            outcome
        }
    });
    // The handlers go in now: a SIGTERM right after start must not meet the default action.
    let signal = shutdown_signal();
    let shutdown = async move {
        tokio::select! {
            () = signal => {}
            () = failed.notified() => {}
        }
        let _ = stop_tx.send(true);
    };
    let exporter = metrics::VpnExporter {
        state_dir: state_dir.to_path_buf(),
        config: runtime_config.clone(),
        per_client: args.metrics_per_client,
    };
    let run = vnf_core::runtime::run(runtime_config, started, shutdown, &mut observer);
    let outcome = metrics_listener.serve_while(&exporter, run).await;
    let vpn_outcome = vpn_task
        .await
        .unwrap_or_else(|error| Err(Error::Vnf(format!("VPN task: {error}"))));
    outcome?;
    vpn_outcome?;
    Ok(ExitCode::SUCCESS)
}

/// The mode profiles are issued in: the running server's, else the PKI's default.
fn profile_mode(pki: &Pki, running: Option<&vpn::VpnStatus>) -> TlsCryptMode {
    running.map_or_else(|| pki.default_tls_crypt_mode(), |status| status.tls_crypt)
}

/// The engine's control-channel wrapping for `mode`, with the keys from the PKI.
fn control_wrap(pki: &Pki, mode: TlsCryptMode) -> Result<ControlWrap> {
    let shared_key = || -> Result<ControlKey> {
        Ok(ControlKey::Crypt(Arc::new(TlsCrypt::server(
            &pki.tls_crypt_key()?,
        ))))
    };
    Ok(match mode {
        TlsCryptMode::V2 => {
            let outdated = pki.clients_needing_new_profile(mode)?;
            if !outdated.is_empty() {
                warn!(clients = %outdated.join(" "), "profile needs tls-crypt-v2: run `dockvpn client config NAME` again for each and hand it out (until then only a tls-crypt v1 profile of theirs connects)");
            }
            ControlWrap::TlsCryptV2 {
                server_key: Arc::new(pki.tls_crypt_v2_server_key()?),
                // Profiles issued under v1 keep working until they are replaced.
                shared: pki.has_tls_crypt_key().then(shared_key).transpose()?,
            }
        }
        TlsCryptMode::V1 => ControlWrap::TlsCrypt(shared_key()?),
        TlsCryptMode::TlsAuth => {
            let key = pki.tls_auth_key()?;
            ControlWrap::TlsAuth(
                tls_auth::DIGESTS
                    .iter()
                    .map(|digest| ControlKey::Auth(Arc::new(TlsAuth::server(&key, *digest))))
                    .collect(),
            )
        }
        TlsCryptMode::Off => {
            info!("tls-crypt off: every peer reaches TLS. Profiles issued so far lack a key; turn it on with --tls-crypt v2 (DOCKVPN_TLS_CRYPT) and issue them again (dockvpn client config NAME)");
            ControlWrap::Plain
        }
    })
}

/// Dockvpn runs one-armed on a single leg; every subcommand assigns sides the way `run` does.
fn one_leg_serves_both_sides(selectors: &mut SideSelectors) {
    selectors.single_leg = SingleLeg::ServesBothSides;
}

/// Serves once every DHCP side holds a lease (at once without `--dhcp`): a client that
/// connected earlier would get none of the lease's routes. Returns early on stop.
async fn serve_once_bound(
    config: vpn::VpnConfig,
    routes: watch::Receiver<BTreeSet<Ipv4Net>>,
    mut stop: watch::Receiver<bool>,
    mut dhcp_bound: watch::Receiver<bool>,
) -> Result<()> {
    tokio::select! {
        bound = dhcp_bound.wait_for(|&bound| bound) => {
            if bound.is_err() {
                return Ok(());
            }
        }
        _ = stop.changed() => return Ok(()),
    }
    vpn::serve(config, routes, stop).await
}

/// Feeds the VPN server with the routes to push and keeps the access table on the left
/// interface and the pushed networks.
struct VpnObserver {
    /// --left-route networks.
    static_routes: BTreeSet<Ipv4Net>,
    /// From the left DHCP lease.
    learned_routes: BTreeSet<Ipv4Net>,
    /// The left side's connected subnet, while the side is ready.
    left_subnet: Option<Ipv4Net>,
    push_left_subnet: bool,
    routes: watch::Sender<BTreeSet<Ipv4Net>>,
    access: AccessTable,
    /// Turns true once every DHCP side is bound; the server then starts.
    dhcp_bound: watch::Sender<bool>,
}

impl VpnObserver {
    /// Tells the server and the access table the routes to push, when they changed. The
    /// server hears first: a failed nft apply must not keep clients on the old routes.
    fn publish_routes(&self) -> Result<()> {
        let mut pushed = self.static_routes.clone();
        pushed.extend(&self.learned_routes);
        if self.push_left_subnet {
            pushed.extend(self.left_subnet);
        }
        self.routes.send_if_modified(|current| {
            let changed = *current != pushed;
            *current = pushed.clone();
            changed
        });
        self.access.update(|access| access.pushed = pushed)
    }
}

impl SidesObserver for VpnObserver {
    fn sides_changed(&mut self, assignment: &Assignment) -> Result<()> {
        let left = assignment.ready(Side::Left);
        self.left_subnet = left.map(|r| r.subnet());
        let interface = left.map(|r| r.name.clone());
        self.access.update(|access| {
            if access.left != interface {
                if let Some(interface) = &interface {
                    info!(%interface, masquerade = access.masquerade, "VPN clients leave through the left side");
                }
                access.left = interface;
            }
        })?;
        self.publish_routes()
    }

    fn shutdown(&mut self, on_exit: OnExit) -> Result<()> {
        // Also when the left side went away: its table stays until removed.
        if on_exit == OnExit::Remove {
            self.access.remove()?;
        }
        Ok(())
    }

    fn dhcp_sides_bound(&mut self, bound: bool) {
        // Once serving, the server stays up through lease changes; the routes follow them.
        if bound {
            self.dhcp_bound.send_replace(true);
        }
    }

    fn left_routes_learned(&mut self, routes: &[LearnedRoute]) {
        self.learned_routes = routes
            .iter()
            .map(|r| r.destination.trunc())
            .filter(|d| d.prefix_len() > 0)
            .collect();
        if let Err(error) = self.publish_routes() {
            warn!(%error, "learned routes not applied to the access table");
        }
    }
}

fn parse_remote(remote: &str, default_port: u16) -> Result<(String, u16)> {
    match remote.rsplit_once(':') {
        Some((host, port)) => {
            let port = port.parse().map_err(|_| {
                Error::invalid(
                    "--remote",
                    remote,
                    "the port after ':' must be a number 1-65535",
                )
            })?;
            Ok((host.to_owned(), port))
        }
        None if !remote.is_empty() => Ok((remote.to_owned(), default_port)),
        None => Err(Error::invalid("--remote", remote, "give HOST or HOST:PORT")),
    }
}

/// The running server's port, from its status file; the default otherwise.
async fn right_address(sides: &SideArgs, state_dir: &Path) -> Result<Ipv4Addr> {
    let kernel = vnf_core::kernel::Kernel::connect()?;
    let interfaces = kernel.interfaces().await?;
    let mut selectors = sides.selectors(state_dir);
    one_leg_serves_both_sides(&mut selectors);
    let assignment = vnf_core::side::assign(&selectors, &interfaces)?;
    assignment
        .ready(Side::Right)
        .map(|ready| ready.address.addr())
        .ok_or_else(|| {
            Error::Vnf("the right side has no address yet, so the profile has no default remote; pass --remote HOST[:PORT]".into())
        })
}

async fn status(state_dir: &Path, routing: &RoutingArgs, json: bool) -> Result<ExitCode> {
    let routing = vnf_core::status::collect(&routing.runtime_config(state_dir)).await?;
    let vpn = read_vpn_status(state_dir);
    let healthy = routing.converged && vpn.is_some();
    let pki = Pki::new(state_dir);
    let outdated = match &vpn {
        Some(vpn) => pki.clients_needing_new_profile(vpn.tls_crypt)?,
        None => Vec::new(),
    };
    let stale = wireguard_profile::stale_clients(&pki.clients()?, vpn.as_ref());
    if json {
        let value = serde_json::json!({
            "healthy": healthy,
            "routing": routing,
            "vpn": vpn,
            "profiles_needing_tls_crypt_v2": outdated,
            "wireguard_profiles_stale": stale,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializes")
        );
    } else {
        print!("{}", routing.render());
        match &vpn {
            Some(vpn) => {
                print!("{}", render_vpn(vpn));
                if !outdated.is_empty() {
                    println!(
                        "  profile needs tls-crypt-v2 (run `dockvpn client config NAME` again): {}",
                        outdated.join(" ")
                    );
                }
                if !stale.is_empty() {
                    println!(
                        "  WireGuard {} (run `dockvpn client config NAME --format wireguard` again): {}",
                        wireguard_profile::STALE_NOTE,
                        stale.join(" ")
                    );
                }
            }
            None if routing.sides.iter().any(|side| {
                side.dhcp_client
                    .as_ref()
                    .is_some_and(|client| !client.is_bound())
            }) =>
            {
                println!("VPN server: not serving until the DHCP lease is bound")
            }
            None => println!("VPN server: not running"),
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The status file of a running server; None when absent or its process is gone.
fn read_vpn_status(state_dir: &Path) -> Option<vpn::VpnStatus> {
    load_vpn_status(state_dir).filter(is_running)
}

/// Warns about allow-list entries outside every network the running server pushes: they
/// grant nothing (until such a route appears).
fn warn_outside_pushed(state_dir: &Path, allow: &[Ipv4Net]) {
    let Some(running) = read_vpn_status(state_dir) else {
        return;
    };
    let mut pushed: BTreeSet<Ipv4Net> = running.routes_pushed.iter().copied().collect();
    if running.redirect_gateway {
        pushed.insert(Ipv4Net::default());
    }
    for net in dockvpn::access::outside_pushed(allow, &pushed) {
        let routes: Vec<String> = pushed.iter().map(ToString::to_string).collect();
        warn!(
            "--allow {net} lies outside every pushed network ({}): it grants nothing until such a route is pushed; give a network inside one of them",
            routes.join(", ")
        );
    }
}

/// A new password: typed twice at a terminal (not echoed), else the first line of stdin.
fn read_password(name: &str) -> Result<String> {
    use std::io::IsTerminal;
    let read_error = |source| Error::Io {
        context: "read the password".to_owned(),
        source,
    };
    if std::io::stdin().is_terminal() {
        let password =
            rpassword::prompt_password(format!("password for {name}: ")).map_err(read_error)?;
        let again = rpassword::prompt_password("again: ").map_err(read_error)?;
        if password != again {
            return Err(Error::Vnf(
                "the two passwords differ; nothing changed: run the command again".into(),
            ));
        }
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(read_error)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// What became of a client's connections when a command cut it off, for its message.
async fn cut_off_running_server(state_dir: &Path) -> &'static str {
    match reload_running_server(state_dir).await {
        Some(true) => "; the running server has cut it off",
        Some(false) => "; the running server cuts it off within 2 s",
        None => "",
    }
}

/// Asks the running server, if one runs, to re-read the registry now (SIGHUP) and waits
/// until it has (its status file counts the reloads): a client added or removed counts for it when
/// the command returns. None when no server runs; false when it did not answer in time (it
/// re-reads the registry every 2 s anyway).
async fn reload_running_server(state_dir: &Path) -> Option<bool> {
    let running = read_vpn_status(state_dir)?;
    let pid = nix::unistd::Pid::from_raw(running.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).ok()?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if load_vpn_status(state_dir).is_some_and(|now| now.reloads > running.reloads) {
            return Some(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(false)
}

fn is_running(status: &vpn::VpnStatus) -> bool {
    Path::new(&format!("/proc/{}", status.pid)).exists()
}

/// The status file as the server last wrote it, whether or not it still runs.
fn load_vpn_status(state_dir: &Path) -> Option<vpn::VpnStatus> {
    let text = std::fs::read_to_string(vpn::status_path(state_dir)).ok()?;
    serde_json::from_str(&text)
        .inspect_err(|error| error!(%error, "status.json unreadable"))
        .ok()
}

fn render_vpn(vpn: &vpn::VpnStatus) -> String {
    let mut out = format!(
        "VPN server: {} {} tun {} pool {} (server {}), tls-crypt {}\n  routes pushed: {}{}\n  clients connected: {}\n",
        vpn.proto,
        vpn.listen,
        vpn.tun,
        vpn.pool,
        vpn.server_address,
        match vpn.tls_crypt {
            TlsCryptMode::Off => "off (profiles carry no key)".to_owned(),
            mode => mode.to_string(),
        },
        if vpn.routes_pushed.is_empty() {
            "none".to_owned()
        } else {
            vpn.routes_pushed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        },
        if vpn.redirect_gateway { " + default (redirect-gateway)" } else { "" },
        vpn.clients.len()
    );
    for client in &vpn.clients {
        let since = vpn.updated_unix.saturating_sub(client.connected_since_unix);
        let keys = match client.latest_handshake_unix {
            Some(handshake) => format!(
                "latest handshake {} s ago, rekeys {}",
                vpn.updated_unix.saturating_sub(handshake),
                client.renegotiations
            ),
            None => format!(
                "key {} ({} s old), keys renegotiated {}",
                client.key_id, client.key_age_secs, client.renegotiations
            ),
        };
        out.push_str(&format!(
            "    {:<20} {:<15} {:<9} from {:<25} {} in {} B out {} B, connected {} s, {keys}\n",
            client.name,
            client.address,
            client.transport,
            format!("{}:{}", client.proto, client.peer),
            client.cipher,
            client.bytes_in,
            client.bytes_out,
            since,
        ));
    }
    if let Some(wireguard) = &vpn.wireguard {
        out.push_str(&format!(
            "  WireGuard: udp {} public key {}\n",
            wireguard.listen, wireguard.public_key
        ));
    }
    if let Some(data_path) = &vpn.data_path {
        out.push_str(&format!(
            "  data path: {} thread{}, UDP offloads {}, tun offloads {}\n",
            data_path.threads,
            if data_path.threads == 1 { "" } else { "s" },
            data_path.udp_offloads,
            data_path.tun_offloads
        ));
    }
    if vpn.handshaking > 0 {
        out.push_str(&format!("  handshakes in progress: {}\n", vpn.handshaking));
    }
    if let Some(tcp) = &vpn.tcp {
        out.push_str(&format!(
            "  TCP connections: {} open; closed: {} over the limit, {} without a session in {} s, {} not reading\n",
            tcp.open,
            tcp.refused_over_limit,
            tcp.closed_without_session,
            tcp::SESSION_DEADLINE.as_secs(),
            tcp.closed_slow_reader
        ));
    }
    let refused: Vec<String> = Refusal::ALL
        .iter()
        .map(|&refusal| (refusal.name(), vpn.refused.get(refusal)))
        .filter(|&(_, count)| count > 0)
        .map(|(name, count)| format!("{count} {name}"))
        .collect();
    if !refused.is_empty() {
        out.push_str(&format!("  clients refused: {}\n", refused.join(", ")));
    }
    if vpn.dropped.total() > 0 {
        out.push_str(&format!("  dropped input: {}\n", vpn.dropped));
    }
    out
}

//! Dockwall: the firewall service instance. With no configuration it routes left↔right
//! (cross mode: a routing table per side and `ip rule` policy between them); operators edit
//! nftables filter and NAT rules with `docker exec <si> dockwall rule …`.

mod api;
mod commands;
mod fwaas;
mod metrics;
mod mirror;
mod ufw;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use vnf_core::cli::{
    execute, CrossTableArgs, JsonArgs, LifecycleArgs, LogArgs, NetworkArgs, SideArgs, OUTPUT,
    SELECTOR_HELP,
};
use vnf_core::firewall::{Action, Direction, PortRange, Protocol, Rate, ServiceMode};
use vnf_core::metrics::MetricsArgs;
use vnf_core::side::Side;

#[derive(Parser, Debug)]
#[command(
    name = "dockwall",
    version,
    about = "Dockwall: container-native firewall VNF between a left and a right network",
    after_help = SELECTOR_HELP
)]
pub struct Cli {
    #[command(flatten)]
    log: LogArgs,

    /// Where the rule set is stored (a volume in the image)
    #[arg(
        long,
        global = true,
        env = "DOCKWALL_STATE_DIR",
        default_value = "/var/lib/dockwall",
        value_name = "DIR"
    )]
    state_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

/// What `run` configures and `status` checks.
#[derive(Args, Debug)]
pub struct RoutingArgs {
    #[command(flatten)]
    network: NetworkArgs,

    #[command(flatten)]
    tables: CrossTableArgs,

    /// Service mode, as OpenContrail names them. in-network: route between the sides (a
    /// table per side), both networks route each other's prefixes via the SI. in-network-nat:
    /// route the same way and masquerade IPv4 forwarded from the left out of the right side
    /// to the SI's right address, so the right network needs no route back; new right-to-left
    /// connections are dropped unless a `nat add dnat` rule forwards them (ct status dnat),
    /// and those go through the right-to-left rules first. transparent: one IP subnet on both
    /// sides; the SI bridges its legs (bridge dockwall0; needs br_netfilter; the legs' IPv4
    /// addresses are recorded in the state dir, taken off, and restored on exit or by the
    /// next `run` after a kill; pin the sides by name or MAC; legs are not followed after
    /// start), filters the bridged traffic with the same rules and conntrack, and refuses NAT
    /// rules; management stays routed. Default: in-network for `run`; for `status`, the mode
    /// `run` recorded with the rules
    #[arg(
        long,
        env = "DOCKWALL_MODE",
        value_enum,
        help_heading = vnf_core::cli::ROUTING
    )]
    mode: Option<ServiceMode>,
}

impl RoutingArgs {
    fn runtime_config(&self, state_dir: &std::path::Path) -> vnf_core::runtime::RuntimeConfig {
        self.network
            .runtime_config(self.tables.routing_config(), state_dir)
    }
}

/// What every edit of the rule set takes: the sides (rules compile per side) and --dry-run.
#[derive(Args, Debug, Clone)]
pub struct EditArgs {
    #[command(flatten)]
    sides: SideArgs,

    /// Print the nft JSON the edit would apply and change nothing
    #[arg(long, help_heading = OUTPUT)]
    dry_run: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Find the sides, apply the stored firewall, route between the sides (cross mode) and
    /// keep both converged as interfaces come and go, until SIGTERM/SIGINT. What follows is
    /// the in-network modes; --mode transparent bridges the sides instead (see --mode).
    ///
    /// Installs a table per side (its subnet and a default via its gateway) and the rules
    /// `iif left lookup <right table>`, `iif right lookup <left table>` at priorities
    /// 1000-1001, and at 1002-1003 rules that send the SI's own resets and ICMP errors back
    /// out of the side the packet came from (by firewall mark); routes and rules carry
    /// protocol 245. Sets net.ipv4.ip_forward=1, net.ipv4.fwmark_reflect=1 and rp_filter=2
    /// (loose) on all/left/right. The firewall lives in the nftables table
    /// `inet dockwall` and nothing else is touched. On exit routing and the table are removed
    /// (see --on-exit); sysctls and the stored rules stay.
    Run {
        #[command(flatten)]
        routing: RoutingArgs,
        #[command(flatten)]
        lifecycle: LifecycleArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
        #[command(flatten)]
        api: api::ApiArgs,
        /// How often to check that the kernel's table still holds the stored rules (rule and
        /// element counts per chain and set) and replace it when not, e.g. after
        /// `nft flush table inet dockwall`. A slow check (a big table) spaces the next one
        /// out to 20 times its duration
        #[arg(
            long,
            env = "DOCKWALL_VERIFY_EVERY",
            default_value = "10",
            value_name = "SECONDS",
            value_parser = clap::value_parser!(u64).range(1..=86_400)
        )]
        verify_every: u64,
    },
    /// Sides, routing, and the rules with their packet/byte counters; exits 1 unless both
    /// sides are ready and routing and firewall are converged (a health check). Give it the
    /// options `run` got (the container's environment does that for a HEALTHCHECK)
    Status {
        #[command(flatten)]
        routing: RoutingArgs,
        #[command(flatten)]
        output: JsonArgs,
    },
    /// Filter rules, evaluated in order: the first match decides
    #[command(subcommand)]
    Rule(RuleCommand),
    /// NAT: masquerade/SNAT out of a side, DNAT port-forwards
    #[command(subcommand)]
    Nat(NatCommand),
    /// Copies of the traffic crossing the SI to a collector (nftables dup)
    #[command(subcommand)]
    Mirror(mirror::MirrorCommand),
    /// What happens to forwarded traffic that no rule decides: in both directions, or with
    /// --direction in one (it then overrides the other setting for that direction)
    Default {
        /// allow (or accept) or deny (or drop)
        #[arg(value_enum)]
        policy: DefaultPolicy,
        /// Only this direction; without it both directions get POLICY and lose overrides
        #[arg(
            long,
            short = 'd',
            value_name = "DIRECTION",
            value_parser = PossibleValuesParser::new(["left-to-right", "right-to-left"])
                .try_map(|name| Direction::from_str(&name, false))
        )]
        direction: Option<Direction>,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Replace the filter rules with an OpenStack FWaaS v2 firewall group (or one policy),
    /// from the Neutron API's own response bodies.
    ///
    /// Give any number of files (`-` is stdin), each holding one or more JSON documents:
    /// {"firewall_group": …}, {"firewall_policy": …} or {"firewall_policies": […]},
    /// {"firewall_rule": …} or {"firewall_rules": […]}, or one object with several of these
    /// keys. The group's ingress policy filters right → left (into the left side), its egress
    /// policy left → right. As in Neutron, a direction with a policy ends in an implicit deny
    /// and a direction without one is not filtered. A group with admin_state_up false drops
    /// new connections in both directions; established flows continue until they end. Remote
    /// firewall groups are not supported.
    Import {
        /// FWaaS v2 response bodies (JSON); `-` reads standard input
        #[arg(long = "fwaas", value_name = "FILE", num_args = 1.., required = true)]
        files: Vec<PathBuf>,
        /// What a lone firewall_policy (no group) filters: ingress (into the left side) or
        /// egress
        #[arg(long = "as", value_enum, default_value = "ingress")]
        role: fwaas::PolicyRole,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Print the filter rules as FWaaS v2 response bodies (a firewall group, its policies,
    /// their rules) that `import --fwaas` reads back
    Export {
        #[arg(long = "fwaas", required = true)]
        fwaas: bool,
    },
    /// ufw's grammar for the rules: `ufw allow 22/tcp`, `ufw route deny in on eth0 out on
    /// eth1 proto icmp`, `ufw status numbered`, `ufw delete 3` (answers in ufw's words)
    #[command(after_long_help = ufw::HELP)]
    Ufw(ufw::UfwArgs),
    /// The REST API and web page that `run --api-listen` serves
    #[command(subcommand)]
    Api(api::ApiCommand),
    /// Replace the whole rule set with FILE (the JSON that `rule list --json` and the state
    /// file use). A `mode` in FILE is ignored with a warning: the mode is `run`'s
    Apply {
        file: PathBuf,
        #[command(flatten)]
        edit: EditArgs,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DefaultPolicy {
    #[value(alias = "accept")]
    Allow,
    #[value(alias = "drop")]
    Deny,
}

#[derive(Subcommand, Debug)]
pub enum RuleCommand {
    /// Append a rule (or place it with --before/--after ID, FWaaS insert_before/insert_after)
    Add {
        #[command(flatten)]
        spec: RuleSpec,
        /// Insert before the rule with this id
        #[arg(long, value_name = "ID", conflicts_with = "after")]
        before: Option<u64>,
        /// Insert after the rule with this id
        #[arg(long, value_name = "ID")]
        after: Option<u64>,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Insert a rule at position N (1 = first)
    Insert {
        position: usize,
        #[command(flatten)]
        spec: RuleSpec,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Delete the rule at position N, or the rule with --id
    Delete(SelectedEdit),
    /// List the rules with their counters
    List(JsonArgs),
    /// Enable the rule at position N or with --id
    Enable(SelectedEdit),
    /// Disable the rule at position N or with --id (kept, not evaluated)
    Disable(SelectedEdit),
}

/// An edit of one existing rule.
#[derive(Args, Debug, Clone)]
pub struct SelectedEdit {
    #[command(flatten)]
    selector: RuleSelector,
    #[command(flatten)]
    edit: EditArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RuleSelector {
    /// Position in `rule list` (1 = first)
    #[arg(required_unless_present = "id", conflicts_with = "id")]
    pub position: Option<usize>,
    /// The rule's stable id
    #[arg(long)]
    pub id: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct RuleSpec {
    /// allow | deny | reject (TCP reset or ICMP unreachable) | limit (allow up to --rate)
    #[arg(value_enum)]
    pub action: Action,
    /// Which traffic: left-to-right, right-to-left, both, or local (to the SI itself)
    #[arg(long, short = 'd', value_enum, default_value = "both")]
    pub direction: Direction,
    /// tcp, udp, sctp, icmp, icmpv6, any, a name like gre, or a number 0-255 [default: any]
    #[arg(long = "proto")]
    pub protocol: Option<Protocol>,
    /// Match only IPv4 or only IPv6 (addresses given with --from/--to imply it)
    #[arg(
        long,
        value_name = "4|6",
        value_parser = PossibleValuesParser::new(["4", "6"]).try_map(|v| v.parse::<u8>())
    )]
    pub ip_version: Option<u8>,
    /// Source address or CIDR
    #[arg(long = "from", value_name = "CIDR", value_parser = parse_net)]
    pub source: Option<IpNet>,
    /// Destination address or CIDR
    #[arg(long = "to", value_name = "CIDR", value_parser = parse_net)]
    pub destination: Option<IpNet>,
    /// Source port or range (N, A:B)
    #[arg(long = "sport", value_name = "PORTS")]
    pub source_port: Option<PortRange>,
    /// Destination port or range (N, A:B)
    #[arg(long = "dport", alias = "port", value_name = "PORTS")]
    pub destination_port: Option<PortRange>,
    /// For limit: packets per second|minute|hour|day, e.g. 10/second
    #[arg(long)]
    pub rate: Option<Rate>,
    /// A name for the rule
    #[arg(long)]
    pub name: Option<String>,
    /// A free-text note kept with the rule
    #[arg(long)]
    pub comment: Option<String>,
    /// Log matching packets (kernel log, prefix "dockwall rule ID")
    #[arg(long)]
    pub log: bool,
    /// Store the rule disabled
    #[arg(long)]
    pub disabled: bool,
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    vnf_core::firewall::model::parse_net(text).ok_or_else(|| {
        format!("{text:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/64)")
    })
}

#[derive(Subcommand, Debug)]
pub enum NatCommand {
    /// Add a NAT rule
    #[command(subcommand)]
    Add(NatSpec),
    /// Delete the NAT rule at position N, or with --id
    Delete(SelectedEdit),
    /// List the NAT rules with their counters
    List(JsonArgs),
}

#[derive(Subcommand, Debug, Clone)]
pub enum NatSpec {
    /// Rewrite the source to the SI's address on the --out side
    Masquerade {
        #[arg(long, value_enum)]
        out: Side,
        /// Only for these sources
        #[arg(long = "from", value_parser = parse_net)]
        source: Option<IpNet>,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Rewrite the source to a fixed address
    Snat {
        #[arg(long, value_enum)]
        out: Side,
        #[arg(long = "to-address")]
        to: std::net::IpAddr,
        #[arg(long = "from", value_parser = parse_net)]
        source: Option<IpNet>,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Port-forward: the SI's --in address (default right), --port, goes to --to ADDR:PORT
    Dnat {
        #[arg(long = "proto", default_value = "tcp")]
        protocol: Protocol,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long = "in", value_enum, default_value = "right")]
        inbound: Side,
        #[command(flatten)]
        edit: EditArgs,
    },
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::try_parse().unwrap_or_else(|error| with_ufw_hint(error).exit());
    cli.log.init();
    execute("dockwall", || commands::dispatch(cli, started))
}

/// An unexpected ufw-style word gets the equivalent flags as the error's tip.
fn with_ufw_hint(mut error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let unexpected = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(argument)) if error.kind() == ErrorKind::UnknownArgument => {
            argument.clone()
        }
        _ => return error,
    };
    let args: Vec<String> = std::env::args().collect();
    if let Some(hint) = ufw::did_you_mean(&args, &unexpected) {
        error.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![hint.into()]),
        );
    }
    error
}

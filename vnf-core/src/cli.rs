//! Command-line pieces shared by the VNF binaries: every flag has an environment variable,
//! because in a service chain the operator sets the container's environment, not its command.

use std::future::Future;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::routing::{RoutingConfig, RoutingMode, TableId};
use crate::runtime::{DhcpConfig, OnExit, RuntimeConfig};
use crate::side::{Side, SideSelector, SideSelectors, SingleLeg};
use crate::side_memory::RememberedSides;

pub const SELECTOR_HELP: &str = "SELECTOR is an interface name (eth1), a MAC address \
(02:42:ac:11:00:02) or a CIDR that the side's IPv4 address falls in (10.0.1.0/24); prefix \
name:, mac: or cidr: to be explicit.";

/// `--help` headings, so each subcommand's options read in groups.
pub const SIDES: &str = "Sides";
pub const ROUTING: &str = "Routing";
pub const DHCP: &str = "DHCP";
pub const FIREWALL: &str = "Firewall";
pub const VPN: &str = "VPN";
pub const OUTPUT: &str = "Output";

/// Which interface serves which side: every subcommand that looks at the sides takes these,
/// so it sees the sides `run` sees.
#[derive(Args, Debug, Clone)]
pub struct SideArgs {
    /// Interface of the left (protected) side [default: first Ethernet interface in order of appearance, kept by MAC across restarts]
    #[arg(long, env = "VNF_LEFT", value_name = "SELECTOR", help_heading = SIDES)]
    pub left: Option<SideSelector>,

    /// Interface of the right side [default: second Ethernet interface in order of appearance, kept by MAC across restarts]
    #[arg(long, env = "VNF_RIGHT", value_name = "SELECTOR", help_heading = SIDES)]
    pub right: Option<SideSelector>,

    /// Management interface, left alone on the main table [default: third Ethernet interface]
    #[arg(long, env = "VNF_MGMT", value_name = "SELECTOR", help_heading = SIDES)]
    pub mgmt: Option<SideSelector>,
}

impl SideArgs {
    /// The selectors given, plus the sides' MACs remembered in `state_dir` by `run`.
    pub fn selectors(&self, state_dir: &Path) -> SideSelectors {
        SideSelectors {
            left: self.left.clone(),
            right: self.right.clone(),
            management: self.mgmt.clone(),
            remembered: RememberedSides::load(state_dir),
            single_leg: SingleLeg::default(),
        }
    }
}

/// What `run` configures and `status` checks against the kernel: both take these, so the
/// health check judges exactly what `run` was asked for.
#[derive(Args, Debug, Clone)]
pub struct NetworkArgs {
    #[command(flatten)]
    pub sides: SideArgs,

    /// Router of the left network [default: first host address of the left subnet]
    #[arg(long, env = "VNF_LEFT_GATEWAY", value_name = "IPV4", help_heading = ROUTING)]
    pub left_gateway: Option<Ipv4Addr>,

    /// Router of the right network [default: first host address of the right subnet]
    #[arg(long, env = "VNF_RIGHT_GATEWAY", value_name = "IPV4", help_heading = ROUTING)]
    pub right_gateway: Option<Ipv4Addr>,

    /// Learn this side's address, gateway and the networks behind it (option 121/249, else
    /// 33 + 3) by DHCP; repeat or comma-separate
    #[arg(
        long,
        env = "VNF_DHCP",
        value_enum,
        value_delimiter = ',',
        value_name = "SIDE",
        help_heading = DHCP
    )]
    pub dhcp: Vec<Side>,

    /// Refuse DHCP leases whose subnet is shorter than this prefix (a /1 would make half of
    /// all addresses on-link)
    #[arg(
        long,
        env = "VNF_DHCP_MIN_PREFIX",
        value_name = "BITS",
        default_value_t = 8,
        value_parser = clap::value_parser!(u8).range(0..=32),
        help_heading = DHCP
    )]
    pub dhcp_min_prefix: u8,

    /// Global mode (Dockvpn; Dockwall routes in cross mode and ignores it): install learned
    /// left routes 0.0.0.0/1 and 128.0.0.0/1 (def1 halves), refused by default because
    /// together they take the right side's default
    #[arg(long, env = "VNF_ACCEPT_WIDE_LEFT_ROUTES", help_heading = ROUTING)]
    pub accept_wide_left_routes: bool,
}

impl NetworkArgs {
    /// The config `run` would use; `state_dir` is where DHCP leases and the sides' MACs are
    /// kept. The lifecycle options are `run`'s alone ([`LifecycleArgs`]); others get defaults.
    pub fn runtime_config(&self, mut routing: RoutingConfig, state_dir: &Path) -> RuntimeConfig {
        routing.left_gateway = self.left_gateway;
        routing.right_gateway = self.right_gateway;
        routing.accept_wide_left_routes = self.accept_wide_left_routes;
        RuntimeConfig {
            selectors: self.sides.selectors(state_dir),
            routing,
            side_timeout: None,
            on_exit: OnExit::Remove,
            dhcp: DhcpConfig {
                sides: self.dhcp.clone(),
                hook: None,
                min_prefix: self.dhcp_min_prefix,
            },
            state_dir: state_dir.to_path_buf(),
        }
    }
}

/// How `run` starts and stops: options no other subcommand has a use for.
#[derive(Args, Debug, Clone)]
pub struct LifecycleArgs {
    /// Give up when the left and right sides are not both up and addressed after this many
    /// seconds (0 waits forever). Sides may appear late: docker network connect, late port plugging
    #[arg(
        long,
        env = "VNF_SIDE_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 60,
        help_heading = SIDES
    )]
    pub side_timeout: u64,

    /// A command run on every lease change, dhclient-script style: VNF_DHCP_REASON
    /// (bound|expired|nak|released), VNF_DHCP_INTERFACE, VNF_DHCP_ADDRESS, VNF_DHCP_ROUTES
    /// ("dest,gateway ..."), and the lease as JSON on stdin
    #[arg(long, env = "VNF_DHCP_HOOK", value_name = "COMMAND", help_heading = DHCP)]
    pub dhcp_hook: Option<PathBuf>,

    /// What happens to the installed routes and rules, and to a DHCP lease, on
    /// SIGTERM/SIGINT: remove them (the lease is released), or keep them so the kernel goes on
    /// forwarding. Sysctls are left as set either way
    #[arg(
        long,
        env = "VNF_ON_EXIT",
        value_enum,
        default_value_t = OnExit::Remove,
        help_heading = ROUTING
    )]
    pub on_exit: OnExit,
}

impl LifecycleArgs {
    /// Completes the config `status` would check ([`NetworkArgs::runtime_config`]) with how
    /// `run` starts and stops.
    pub fn apply(&self, config: &mut RuntimeConfig) {
        config.side_timeout =
            (self.side_timeout > 0).then(|| Duration::from_secs(self.side_timeout));
        config.on_exit = self.on_exit;
        config.dhcp.hook = self.dhcp_hook.clone();
    }
}

/// Cross-mode routing tables, one per side.
#[derive(Args, Debug, Clone)]
pub struct CrossTableArgs {
    /// Routing table holding the left subnet and the default via the left gateway;
    /// traffic arriving on the right looks it up (1-252 or 256-4294967295)
    #[arg(
        long,
        env = "VNF_LEFT_TABLE",
        value_name = "ID",
        default_value = "1001",
        help_heading = ROUTING
    )]
    pub left_table: TableId,

    /// Routing table holding the right subnet and the default via the right gateway;
    /// traffic arriving on the left looks it up
    #[arg(
        long,
        env = "VNF_RIGHT_TABLE",
        value_name = "ID",
        default_value = "1002",
        help_heading = ROUTING
    )]
    pub right_table: TableId,
}

impl CrossTableArgs {
    pub fn routing_config(&self) -> RoutingConfig {
        RoutingConfig {
            left_table: self.left_table,
            right_table: self.right_table,
            ..RoutingConfig::new(RoutingMode::Cross)
        }
    }
}

/// `--json` for the subcommands that print a report.
#[derive(Args, Debug, Clone, Copy)]
pub struct JsonArgs {
    /// Print JSON for scripts
    #[arg(long, help_heading = OUTPUT)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log line format on stderr; the level comes from RUST_LOG (default info)
    #[arg(
        long,
        global = true,
        env = "VNF_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        help_heading = OUTPUT
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    pub fn init(&self) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        match self.log_format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
    }
}

/// Completes on the first SIGTERM or SIGINT. The handlers are installed at the call, not at
/// the first poll, so a signal that arrives while the runtime is still starting up is not
/// lost to the default action. Call it inside the tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Runs a subcommand on a current-thread runtime (one core is plenty and keeps RSS small)
/// and turns an error into `program: message` on stderr with exit code 1.
pub fn execute<F, Fut>(program: &str, task: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = crate::Result<ExitCode>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{program}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async { task().await }) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{program}: {error}");
            ExitCode::FAILURE
        }
    }
}

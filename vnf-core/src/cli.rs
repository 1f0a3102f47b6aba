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
use crate::side::{Side, SideSelector, SideSelectors};
use crate::side_memory::RememberedSides;

pub const SELECTOR_HELP: &str = "SELECTOR is an interface name (eth1), a MAC address \
(02:42:ac:11:00:02) or a CIDR that the side's IPv4 address falls in (10.0.1.0/24); prefix \
name:, mac: or cidr: to be explicit.";

/// How the VNF finds its sides and reaches each side's gateway.
#[derive(Args, Debug, Clone)]
pub struct SideArgs {
    /// Interface of the left (protected) side [default: first Ethernet interface in order of appearance, kept by MAC across restarts]
    #[arg(long, global = true, env = "VNF_LEFT", value_name = "SELECTOR")]
    pub left: Option<SideSelector>,

    /// Interface of the right side [default: second Ethernet interface in order of appearance, kept by MAC across restarts]
    #[arg(long, global = true, env = "VNF_RIGHT", value_name = "SELECTOR")]
    pub right: Option<SideSelector>,

    /// Management interface, left alone on the main table [default: third Ethernet interface]
    #[arg(long, global = true, env = "VNF_MGMT", value_name = "SELECTOR")]
    pub mgmt: Option<SideSelector>,

    /// Router of the left network [default: first host address of the left subnet]
    #[arg(long, global = true, env = "VNF_LEFT_GATEWAY", value_name = "IPV4")]
    pub left_gateway: Option<Ipv4Addr>,

    /// Router of the right network [default: first host address of the right subnet]
    #[arg(long, global = true, env = "VNF_RIGHT_GATEWAY", value_name = "IPV4")]
    pub right_gateway: Option<Ipv4Addr>,

    /// Give up when the left and right sides are not both up and addressed after this many
    /// seconds (0 waits forever). Sides may appear late: docker network connect, late port plugging
    #[arg(
        long,
        global = true,
        env = "VNF_SIDE_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 60
    )]
    pub side_timeout: u64,

    /// Learn this side's address, gateway and the networks behind it (option 121/249, else
    /// 33 + 3) by DHCP; repeat or comma-separate. On exit the lease is released with
    /// --on-exit remove, kept (address and routes stay) with --on-exit keep
    #[arg(
        long,
        global = true,
        env = "VNF_DHCP",
        value_enum,
        value_delimiter = ',',
        value_name = "SIDE"
    )]
    pub dhcp: Vec<Side>,

    /// A command run on every lease change, dhclient-script style: VNF_DHCP_REASON
    /// (bound|expired|nak|released), VNF_DHCP_INTERFACE, VNF_DHCP_ADDRESS, VNF_DHCP_ROUTES
    /// ("dest,gateway ..."), and the lease as JSON on stdin
    #[arg(long, global = true, env = "VNF_DHCP_HOOK", value_name = "COMMAND")]
    pub dhcp_hook: Option<PathBuf>,

    /// Refuse DHCP leases whose subnet is shorter than this prefix (a /1 would make half of
    /// all addresses on-link)
    #[arg(
        long,
        global = true,
        env = "VNF_DHCP_MIN_PREFIX",
        value_name = "BITS",
        default_value_t = 8,
        value_parser = clap::value_parser!(u8).range(0..=32)
    )]
    pub dhcp_min_prefix: u8,

    /// Global mode: install learned left routes 0.0.0.0/1 and 128.0.0.0/1 (def1 halves),
    /// refused by default because together they take the right side's default
    #[arg(long, global = true, env = "VNF_ACCEPT_WIDE_LEFT_ROUTES")]
    pub accept_wide_left_routes: bool,

    /// What happens to the installed routes and rules on SIGTERM/SIGINT: remove them, or keep
    /// them so the kernel goes on forwarding. Sysctls are left as set either way
    #[arg(long, global = true, env = "VNF_ON_EXIT", value_enum, default_value_t = OnExit::Remove)]
    pub on_exit: OnExit,
}

impl SideArgs {
    /// The selectors given, plus the sides' MACs remembered in `state_dir` by `run`: every
    /// subcommand must see the sides `run` sees.
    pub fn selectors(&self, state_dir: &Path) -> SideSelectors {
        SideSelectors {
            left: self.left.clone(),
            right: self.right.clone(),
            management: self.mgmt.clone(),
            remembered: RememberedSides::load(state_dir),
        }
    }

    /// The runtime config; `state_dir` is where DHCP leases and the sides' MACs are kept.
    pub fn runtime_config(&self, mut routing: RoutingConfig, state_dir: &Path) -> RuntimeConfig {
        routing.left_gateway = self.left_gateway;
        routing.right_gateway = self.right_gateway;
        routing.accept_wide_left_routes = self.accept_wide_left_routes;
        RuntimeConfig {
            selectors: self.selectors(state_dir),
            routing,
            side_timeout: (self.side_timeout > 0).then(|| Duration::from_secs(self.side_timeout)),
            on_exit: self.on_exit,
            dhcp: DhcpConfig {
                sides: self.dhcp.clone(),
                hook: self.dhcp_hook.clone(),
                min_prefix: self.dhcp_min_prefix,
            },
            state_dir: state_dir.to_path_buf(),
        }
    }
}

/// Cross-mode routing tables, one per side.
#[derive(Args, Debug, Clone)]
pub struct CrossTableArgs {
    /// Routing table holding the left subnet and the default via the left gateway;
    /// traffic arriving on the right looks it up (1-252 or 256-4294967295)
    #[arg(
        long,
        global = true,
        env = "VNF_LEFT_TABLE",
        value_name = "ID",
        default_value = "1001"
    )]
    pub left_table: TableId,

    /// Routing table holding the right subnet and the default via the right gateway;
    /// traffic arriving on the left looks it up
    #[arg(
        long,
        global = true,
        env = "VNF_RIGHT_TABLE",
        value_name = "ID",
        default_value = "1002"
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log line format on stderr; the level comes from RUST_LOG (default info)
    #[arg(long, global = true, env = "VNF_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
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

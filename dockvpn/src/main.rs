//! Dockvpn: the SSL VPN service instance. It routes in global mode: `main` holds the default
//! via the right gateway and the left-side networks via the left gateway, configured or
//! learned by DHCP (`--dhcp left`); the OpenVPN server arrives in a later release.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use vnf_core::cli::{execute, print_status, shutdown_signal, LogArgs, SideArgs, SELECTOR_HELP};
use vnf_core::routing::{RoutingConfig, RoutingMode};
use vnf_core::runtime::NoObserver;

#[derive(Parser, Debug)]
#[command(
    name = "dockvpn",
    version,
    about = "Dockvpn: container-native SSL VPN VNF giving remote users the networks behind its left side",
    after_help = SELECTOR_HELP
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,

    /// Where Dockvpn keeps its state (DHCP leases now; PKI and clients later; a volume in the image)
    #[arg(
        long,
        global = true,
        env = "DOCKVPN_STATE_DIR",
        default_value = "/var/lib/dockvpn",
        value_name = "DIR"
    )]
    state_dir: std::path::PathBuf,

    #[command(flatten)]
    sides: SideArgs,

    #[command(flatten)]
    routes: LeftRoutes,

    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct LeftRoutes {
    /// A network behind the left gateway, routed there and (later) pushed to VPN clients;
    /// repeat the flag, or comma-separate in the env var
    #[arg(
        long = "left-route",
        global = true,
        env = "VNF_LEFT_ROUTES",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    left_routes: Vec<Ipv4Net>,
}

impl LeftRoutes {
    fn routing_config(&self) -> RoutingConfig {
        RoutingConfig {
            left_routes: self.left_routes.iter().map(Ipv4Net::trunc).collect(),
            ..RoutingConfig::new(RoutingMode::Global)
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find the sides and route in global mode until SIGTERM/SIGINT.
    ///
    /// In `main`: the default route via the right gateway (replacing a default Docker set
    /// via the first network; restored on exit) and each --left-route via the left gateway;
    /// routes carry protocol 245. Sets net.ipv4.ip_forward=1 and rp_filter=2 (loose). On exit
    /// the routes are removed (see --on-exit); sysctls stay.
    Run,
    /// Show the sides and the installed routing; exits 1 unless converged.
    Status {
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    cli.log.init();
    execute("dockvpn", || async move {
        match cli.command {
            Command::Run => {
                let config = cli
                    .sides
                    .runtime_config(cli.routes.routing_config(), &cli.state_dir);
                vnf_core::runtime::run(config, started, shutdown_signal(), &mut NoObserver).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { json } => {
                print_status(
                    &cli.sides
                        .runtime_config(cli.routes.routing_config(), &cli.state_dir),
                    json,
                )
                .await
            }
        }
    })
}

//! Dockvpn: the SSL VPN service instance. It routes in global mode: `main` holds the default
//! via the right gateway and the left-side networks via the left gateway; the OpenVPN
//! server and the DHCP-learned routes arrive in later releases.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use vnf_core::cli::{shutdown_signal, LogArgs, SideArgs, SELECTOR_HELP};
use vnf_core::routing::{RoutingConfig, RoutingMode};

#[derive(Parser, Debug)]
#[command(name = "dockvpn", version, about = "Dockvpn: container-native SSL VPN VNF giving remote users the networks behind its left side", after_help = SELECTOR_HELP)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find the sides and route in global mode until SIGTERM/SIGINT.
    ///
    /// In `main`: the default route via the right gateway (replacing a default Docker set
    /// via the first network; restored on exit) and each --left-route via the left gateway;
    /// routes carry protocol 245. Sets net.ipv4.ip_forward=1 and rp_filter=2 (loose). On exit
    /// the routes are removed (see --on-exit); sysctls stay.
    #[command(after_help = SELECTOR_HELP)]
    Run {
        #[command(flatten)]
        sides: SideArgs,

        /// A network behind the left gateway, routed there and (later) pushed to VPN clients;
        /// repeat the flag, or comma-separate in the env var
        #[arg(long = "left-route", env = "VNF_LEFT_ROUTES", value_name = "CIDR", value_delimiter = ',')]
        left_routes: Vec<Ipv4Net>,
    },
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    cli.log.init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dockvpn: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run { sides, left_routes } => {
            let routing = RoutingConfig {
                left_routes: left_routes.into_iter().map(|net| net.trunc()).collect(),
                ..RoutingConfig::new(RoutingMode::Global)
            };
            let config = sides.runtime_config(routing);
            runtime.block_on(vnf_core::runtime::run(config, started, shutdown_signal()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dockvpn: {error}");
            ExitCode::FAILURE
        }
    }
}

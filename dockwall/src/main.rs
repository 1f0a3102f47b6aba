//! Dockwall: the firewall service instance. It routes left↔right with no configuration
//! (cross mode: a routing table per side and `ip rule` policy between them); the nftables
//! firewall arrives in a later release.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use vnf_core::cli::{
    execute, print_status, shutdown_signal, CrossTableArgs, LogArgs, SideArgs, SELECTOR_HELP,
};

#[derive(Parser, Debug)]
#[command(
    name = "dockwall",
    version,
    about = "Dockwall: container-native firewall VNF between a left and a right network",
    after_help = SELECTOR_HELP
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find the sides, route between them (cross mode) and keep routing converged as
    /// interfaces come and go, until SIGTERM/SIGINT.
    ///
    /// Installs a table per side (its subnet and a default via its gateway) and the rules
    /// `iif left lookup <right table>`, `iif right lookup <left table>` at priorities
    /// 1000-1001; routes and rules carry protocol 245. Sets net.ipv4.ip_forward=1 and
    /// rp_filter=2 (loose) on all/left/right. On exit the routes and rules are removed
    /// (see --on-exit); sysctls stay.
    #[command(after_help = SELECTOR_HELP)]
    Run {
        #[command(flatten)]
        sides: SideArgs,
        #[command(flatten)]
        tables: CrossTableArgs,
    },
    /// Show the sides and the installed routing as the kernel holds them; exits 1 unless
    /// both sides are ready and routing is converged (usable as a health check). Takes the
    /// same selectors as `run` (the container's VNF_* environment applies to both).
    #[command(after_help = SELECTOR_HELP)]
    Status {
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sides: SideArgs,
        #[command(flatten)]
        tables: CrossTableArgs,
    },
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    cli.log.init();
    execute("dockwall", || async move {
        match cli.command {
            Command::Run { sides, tables } => {
                let config = sides.runtime_config(tables.routing_config());
                vnf_core::runtime::run(config, started, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Status {
                json,
                sides,
                tables,
            } => print_status(&sides.runtime_config(tables.routing_config()), json).await,
        }
    })
}

//! `chain-graph [--out DIR] [--project NAME] [--json]`: the running chain as a picture
//! (`cargo xtask graph` runs it). See `docknfv_tests::graph`.

use std::path::PathBuf;
use std::process::ExitCode;

use docknfv_tests::docker::DockerClient;
use docknfv_tests::graph::{render, ChainGraph};

const USAGE: &str = "usage: chain-graph [--out DIR] [--project NAME] [--json]

Reads the running containers and their networks from Docker and writes DIR/chain.dot,
DIR/chain.svg and DIR/chain.png (Graphviz): a node per network and per container, an edge
per leg. Service instances (Dockwall, Dockvpn) show their health and which leg is their
left, right and mgmt side (from their own `status --json`); Dockwall's mirrors show as
dashed edges to their collectors.

  --out DIR        where to write the files (default: the current directory)
  --project NAME   only the containers of this Compose project (e.g. compose, for compose/)
  --json           print the graph read from Docker as JSON instead of the summary";

struct Options {
    out: PathBuf,
    project: Option<String>,
    json: bool,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        out: PathBuf::from("."),
        project: None,
        json: false,
    };
    let mut args = args;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--json" => options.json = true,
            "--out" => {
                options.out = args
                    .next()
                    .ok_or("--out needs a directory, e.g. --out graph")?
                    .into()
            }
            "--project" => {
                options.project = Some(
                    args.next()
                        .ok_or("--project needs a Compose project name, e.g. --project compose")?,
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(options))
}

fn run(options: &Options) -> Result<(), String> {
    let docker = DockerClient::connect_daemon()?;
    let graph = ChainGraph::read(&docker, options.project.as_deref())?;
    if graph.containers.is_empty() {
        let scope = match &options.project {
            Some(project) => format!("of Compose project {project:?}"),
            None => "at all".to_owned(),
        };
        return Err(format!(
            "no running containers {scope}: bring the chain up first (compose/chain.sh up)"
        ));
    }
    let written = render(&graph.to_dot(), &options.out)?;
    if options.json {
        let json = serde_json::to_string_pretty(&graph).map_err(|e| e.to_string())?;
        println!("{json}");
        return Ok(());
    }
    let service_instances = graph
        .containers
        .iter()
        .filter(|c| c.service_instance.is_some())
        .count();
    let mirrors: usize = graph.containers.iter().map(|c| c.mirrors.len()).sum();
    println!(
        "{} networks, {} containers ({service_instances} service instances), {} legs, {mirrors} mirrors",
        graph.networks.len(),
        graph.containers.len(),
        graph.leg_count()
    );
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(options)) => match run(&options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("chain-graph: {error}");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            eprintln!("chain-graph: {error}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

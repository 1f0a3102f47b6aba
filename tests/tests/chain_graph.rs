//! `cargo xtask graph` on the compose chain brought up for real (compose/chain.sh): the
//! graph read from Docker holds a node for every container and network of the project and
//! an edge per leg, the SIs' legs carry the sides they chose (from their own status), and
//! Graphviz renders it to SVG and PNG. The container and network lists it is checked
//! against come from the docker CLI, not from the code under test.

use std::process::Command;
use std::time::Duration;

use docknfv_tests::compose::ComposeChain;
use docknfv_tests::graph::{render, ChainGraph};
use docknfv_tests::netns::run_checked;
use docknfv_tests::prereq::require_command;

/// Without dashes (docker-compose 1.29 strips them); not compose_chain.rs's project, so
/// the two suites can run one after the other without sharing containers. They cannot run
/// at the same time: compose/ gives its networks fixed bridge names and subnets, so the
/// second `up` fails on them. `cargo test` (and so `cargo xtask test`) runs test binaries
/// one after another, which keeps them apart; do not start both by hand in parallel.
const PROJECT: &str = "docknfvgraphtest";
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

fn docker_lines(args: &[&str]) -> Vec<String> {
    run_checked(Command::new("docker").args(args))
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_graph_of_the_compose_chain_has_every_container_network_and_leg() {
    require_command("dot", "graphviz");
    let chain = ComposeChain::up(PROJECT);
    let docker = &chain.docker;
    for service in ["dockwall", "dockvpn"] {
        docker.wait_healthy(&chain.container(service), HEALTHY_WITHIN);
    }
    let project_label = format!("label=com.docker.compose.project={PROJECT}");
    let containers = docker_lines(&["ps", "--filter", &project_label, "--format", "{{.Names}}"]);
    let networks = docker_lines(&[
        "network",
        "ls",
        "--filter",
        &project_label,
        "--format",
        "{{.Name}}",
    ]);
    assert_eq!(
        containers.len(),
        6,
        "the compose chain's six services: {containers:?}"
    );
    assert_eq!(networks.len(), 3, "left, right, mgmt: {networks:?}");

    let graph = ChainGraph::read(docker, Some(PROJECT)).expect("the graph from Docker");
    let graph_containers: Vec<&str> = graph.containers.iter().map(|c| c.name.as_str()).collect();
    let mut expected_containers: Vec<&str> = containers.iter().map(String::as_str).collect();
    expected_containers.sort();
    assert_eq!(
        graph_containers, expected_containers,
        "a node per container"
    );
    let graph_networks: Vec<&str> = graph.networks.iter().map(|n| n.name.as_str()).collect();
    let mut expected_networks: Vec<&str> = networks.iter().map(String::as_str).collect();
    expected_networks.sort();
    assert_eq!(graph_networks, expected_networks, "a node per network");

    // Every leg Docker knows of, container by container.
    let mut legs = 0;
    for container in &graph.containers {
        let attached = docker_lines(&[
            "inspect",
            "--format",
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}\n{{end}}",
            &container.name,
        ]);
        let drawn: Vec<&str> = container.legs.iter().map(|l| l.network.as_str()).collect();
        assert_eq!(drawn, attached, "{}: a leg per network", container.name);
        legs += attached.len();
    }
    // The SIs' legs carry the side each SI took: the compose file pins them by subnet.
    for service in ["dockwall", "dockvpn"] {
        let si = graph
            .containers
            .iter()
            .find(|c| c.service_instance.as_deref() == Some(service))
            .unwrap_or_else(|| panic!("{service} is not drawn as a service instance"));
        assert_eq!(si.health, "healthy", "{service}");
        for side in ["left", "right", "mgmt"] {
            let leg = si
                .legs
                .iter()
                .find(|leg| leg.network == format!("{PROJECT}_{side}"))
                .unwrap_or_else(|| panic!("{service} has no leg on {PROJECT}_{side}"));
            assert_eq!(leg.sides, [side], "{service}'s leg on {}", leg.network);
        }
    }
    let hosts = graph
        .containers
        .iter()
        .filter(|c| c.service_instance.is_none());
    for host in hosts {
        assert!(
            host.legs.iter().all(|leg| leg.sides.is_empty()),
            "{} is a host, not an SI",
            host.name
        );
    }

    let dot = graph.to_dot();
    for name in &containers {
        assert!(
            dot.contains(&format!("\"ctr:{name}\" [")),
            "no node for {name}:\n{dot}"
        );
    }
    for name in &networks {
        assert!(
            dot.contains(&format!("\"net:{name}\" [")),
            "no node for {name}:\n{dot}"
        );
    }
    assert_eq!(
        dot.matches(" -- \"net:").count(),
        legs,
        "an edge per leg:\n{dot}"
    );

    let out = std::env::temp_dir().join(format!("docknfv-graph-{}", std::process::id()));
    let written = render(&dot, &out).expect("render with graphviz");
    let svg = std::fs::read_to_string(out.join("chain.svg")).expect("chain.svg");
    assert!(svg.contains("<svg"), "not an SVG");
    // Graphviz writes a hyphen in SVG text as a character reference.
    let svg = svg.replace("&#45;", "-");
    for name in &containers {
        assert!(svg.contains(name.as_str()), "{name} missing from the SVG");
    }
    let png = std::fs::read(out.join("chain.png")).expect("chain.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert_eq!(written.len(), 3, "chain.dot, chain.svg, chain.png");
    let _ = std::fs::remove_dir_all(&out);
}

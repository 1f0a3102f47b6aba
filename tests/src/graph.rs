//! A picture of the running chain: what Docker runs (networks, service instances with their
//! left/right/mgmt legs and health, hosts, Dockwall's mirrors) as Graphviz DOT, rendered to
//! SVG and PNG with Debian's `graphviz`.
//!
//! Which leg is which side comes from the SI itself: `docker exec SI <binary> status --json`
//! names the interface (by MAC) it took for each side, and Docker names the network each MAC
//! sits on. Labels and the order of `docker network connect` are not trusted for this: an SI
//! may pin its sides by CIDR or MAC, and Docker does not keep interface order. An SI whose
//! status cannot be read shows its legs with side `?`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use serde::Serialize;

use crate::docker::DockerClient;

/// The binaries whose containers are service instances (the images' entrypoints).
const SERVICE_INSTANCE_BINARIES: [&str; 2] = ["dockwall", "dockvpn"];
/// Compose's project label, for `--project`.
const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChainGraph {
    pub networks: Vec<NetworkNode>,
    pub containers: Vec<ContainerNode>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetworkNode {
    pub name: String,
    pub subnet: Option<String>,
    pub internal: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContainerNode {
    pub name: String,
    pub image: String,
    /// The SI's binary (`dockwall`, `dockvpn`); `None` for a host.
    pub service_instance: Option<String>,
    /// The health check's verdict (`healthy`, `unhealthy`, `starting`), else the state.
    pub health: String,
    pub legs: Vec<Leg>,
    pub mirrors: Vec<Mirror>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Leg {
    pub network: String,
    pub address: Option<String>,
    /// The SI's sides on this leg (`left`, `right`, `mgmt`; both `left` and `right` when
    /// one-armed); empty for a host, `?` when the SI's status could not be read.
    pub sides: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mirror {
    /// The collector the copies go to.
    pub to: String,
    /// What is mirrored, as `mirror list --json` describes it (side, match).
    pub what: String,
}

impl ChainGraph {
    /// Reads the running containers (those of compose `project` only, if given) and the
    /// networks they are attached to.
    pub fn read(docker: &DockerClient, project: Option<&str>) -> Result<ChainGraph, String> {
        let project_filter = project.map(|p| format!("{COMPOSE_PROJECT_LABEL}={p}"));
        let mut filters = HashMap::new();
        if let Some(filter) = &project_filter {
            filters.insert("label", vec![filter.as_str()]);
        }
        let summaries = docker
            .block_on(
                docker.api().list_containers(Some(
                    ListContainersOptionsBuilder::default()
                        .filters(&filters)
                        .build(),
                )),
            )
            .map_err(|e| format!("list containers: {e}"))?;
        let mut containers = Vec::new();
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            containers.push(read_container(docker, &id)?);
        }
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        let network_names: BTreeSet<&str> = containers
            .iter()
            .flat_map(|c| c.legs.iter().map(|leg| leg.network.as_str()))
            .collect();
        let mut networks = Vec::new();
        for name in network_names {
            let network = docker
                .block_on(docker.api().inspect_network(
                    name,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                ))
                .map_err(|e| format!("inspect network {name}: {e}"))?;
            let subnet = network
                .ipam
                .and_then(|ipam| ipam.config)
                .and_then(|configs| configs.into_iter().find_map(|config| config.subnet));
            networks.push(NetworkNode {
                name: name.to_owned(),
                subnet,
                internal: network.internal.unwrap_or(false),
            });
        }
        Ok(ChainGraph {
            networks,
            containers,
        })
    }

    /// The graph in Graphviz DOT: a node per network and per container, an edge per leg
    /// (labelled with the SI's side and the address), a dashed edge per mirror.
    pub fn to_dot(&self) -> String {
        let mut dot = String::from("graph chain {\n");
        dot.push_str("  graph [rankdir=LR, fontname=\"Helvetica\", nodesep=0.4, ranksep=1.2];\n");
        dot.push_str("  node [fontname=\"Helvetica\", fontsize=10];\n");
        dot.push_str("  edge [fontname=\"Helvetica\", fontsize=9];\n");
        for network in &self.networks {
            let mut label = network.name.clone();
            if let Some(subnet) = &network.subnet {
                label.push('\n');
                label.push_str(subnet);
            }
            if network.internal {
                label.push_str("\n(internal)");
            }
            let _ = writeln!(
                dot,
                "  {} [shape=ellipse, style=filled, fillcolor=\"#dce8f8\", label={}];",
                quote(&network_id(&network.name)),
                quote(&label)
            );
        }
        for container in &self.containers {
            let node = container_id(&container.name);
            let (shape, fill) = match &container.service_instance {
                Some(_) => ("box3d", health_colour(&container.health)),
                None => ("box", "#eeeeee"),
            };
            let role = match &container.service_instance {
                Some(binary) => format!("SI {binary}"),
                None => "host".to_owned(),
            };
            let label = format!(
                "{}\n{role} · {}\n{}",
                container.name, container.health, container.image
            );
            let _ = writeln!(
                dot,
                "  {} [shape={shape}, style=\"rounded,filled\", fillcolor=\"{fill}\", label={}];",
                quote(&node),
                quote(&label)
            );
            for leg in &container.legs {
                let side = leg.sides.join("+");
                let label = match (&leg.address, side.is_empty()) {
                    (Some(address), false) => format!("{side}\n{address}"),
                    (Some(address), true) => address.clone(),
                    (None, _) => side.clone(),
                };
                let _ = writeln!(
                    dot,
                    "  {} -- {} [label={}, color=\"{}\", penwidth={}];",
                    quote(&node),
                    quote(&network_id(&leg.network)),
                    quote(&label),
                    side_colour(&leg.sides),
                    if leg.sides.is_empty() { "1" } else { "2" }
                );
            }
            for (index, mirror) in container.mirrors.iter().enumerate() {
                let collector = format!("mirror:{}:{index}", container.name);
                let _ = writeln!(
                    dot,
                    "  {} [shape=note, label={}];",
                    quote(&collector),
                    quote(&format!("collector\n{}", mirror.to))
                );
                let _ = writeln!(
                    dot,
                    "  {} -- {} [style=dashed, label={}];",
                    quote(&node),
                    quote(&collector),
                    quote(&format!("mirror {}", mirror.what))
                );
            }
        }
        dot.push_str("}\n");
        dot
    }

    pub fn leg_count(&self) -> usize {
        self.containers.iter().map(|c| c.legs.len()).sum()
    }
}

/// Writes `chain.dot` into `dir` and renders `chain.svg` and `chain.png` from it with
/// Graphviz's `dot`; the three paths.
pub fn render(dot: &str, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let source = dir.join("chain.dot");
    std::fs::write(&source, dot).map_err(|e| format!("write {}: {e}", source.display()))?;
    let mut written = vec![source.clone()];
    for format in ["svg", "png"] {
        let target = dir.join(format!("chain.{format}"));
        let output = Command::new("dot")
            .arg(format!("-T{format}"))
            .arg("-o")
            .arg(&target)
            .arg(&source)
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "`dot` is missing: apt-get install graphviz (cargo xtask graph installs it)"
                        .to_owned()
                }
                _ => format!("run dot: {e}"),
            })?;
        if !output.status.success() {
            return Err(format!(
                "dot -T{format} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        written.push(target);
    }
    Ok(written)
}

fn read_container(docker: &DockerClient, id: &str) -> Result<ContainerNode, String> {
    let inspect = docker
        .block_on(
            docker
                .api()
                .inspect_container(id, None::<InspectContainerOptions>),
        )
        .map_err(|e| format!("inspect container {id}: {e}"))?;
    let name = inspect
        .name
        .as_deref()
        .unwrap_or(id)
        .trim_start_matches('/')
        .to_owned();
    let config = inspect.config.unwrap_or_default();
    let image = config.image.unwrap_or_default();
    let binary = config
        .entrypoint
        .unwrap_or_default()
        .first()
        .and_then(|path| path.rsplit('/').next().map(str::to_owned))
        .filter(|binary| SERVICE_INSTANCE_BINARIES.contains(&binary.as_str()));
    let state = inspect.state.unwrap_or_default();
    let health = state
        .health
        .and_then(|health| health.status)
        .map(|status| status.to_string())
        .filter(|status| !status.is_empty() && status != "none")
        .or_else(|| state.status.map(|status| status.to_string()))
        .unwrap_or_else(|| "unknown".to_owned());
    let endpoints = inspect
        .network_settings
        .and_then(|settings| settings.networks)
        .unwrap_or_default();
    // Outer `None`: a host; inner `None`: an SI whose status could not be read.
    let status = binary.as_ref().map(|binary| si_status(docker, id, binary));
    let sides_by_mac = status
        .as_ref()
        .map(|status| status.as_ref().map(sides_from_status));
    let mut legs: Vec<Leg> = endpoints
        .into_iter()
        .map(|(network, endpoint)| {
            let address = endpoint
                .ip_address
                .filter(|address| !address.is_empty())
                .map(|address| match endpoint.ip_prefix_len {
                    Some(len) if len > 0 => format!("{address}/{len}"),
                    _ => address,
                });
            let sides = match (&sides_by_mac, endpoint.mac_address) {
                (None, _) => Vec::new(),
                (Some(Some(by_mac)), Some(mac)) => by_mac
                    .get(&mac.to_ascii_lowercase())
                    .cloned()
                    .unwrap_or_default(),
                (Some(_), _) => vec!["?".to_owned()],
            };
            Leg {
                network,
                address,
                sides,
            }
        })
        .collect();
    legs.sort_by(|a, b| a.network.cmp(&b.network));
    let mirrors = match (binary.as_deref(), &status) {
        (Some("dockwall"), Some(Some(status))) => mirrors_from_status(status),
        _ => Vec::new(),
    };
    Ok(ContainerNode {
        name,
        image,
        service_instance: binary,
        health,
        legs,
        mirrors,
    })
}

/// The SI's `status --json` (which it prints also while it is not converged, exiting 1);
/// `None` when it cannot be read.
fn si_status(docker: &DockerClient, id: &str, binary: &str) -> Option<serde_json::Value> {
    let (_, output) = docker.exec_stdout(id, &[binary, "status", "--json"]).ok()?;
    serde_json::from_str(&output).ok()
}

/// `{mac: [side, …]}` from a status document: `routing.sides` holds
/// `{"side": "left", "interface": {"mac": "…"}}` entries (`interface` null for a side not
/// found).
pub fn sides_from_status(status: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    let mut by_mac: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in status["routing"]["sides"].as_array().into_iter().flatten() {
        if let (Some(side), Some(mac)) =
            (entry["side"].as_str(), entry["interface"]["mac"].as_str())
        {
            by_mac
                .entry(mac.to_ascii_lowercase())
                .or_default()
                .push(side.to_owned());
        }
    }
    by_mac
}

/// Dockwall's mirrors from its status document's `firewall.mirrors`.
pub fn mirrors_from_status(status: &serde_json::Value) -> Vec<Mirror> {
    status["firewall"]["mirrors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            let what = ["side", "match", "via"]
                .iter()
                .filter_map(|key| match &entry[*key] {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(text) => Some(format!("{key} {text}")),
                    serde_json::Value::Object(fields) if *key == "match" => {
                        let words = describe_mirror_match(fields);
                        (!words.is_empty()).then(|| format!("match {words}"))
                    }
                    other => Some(format!("{key} {other}")),
                })
                .collect::<Vec<_>>()
                .join(", ");
            Mirror {
                to: entry["to"].as_str().unwrap_or_default().to_owned(),
                what,
            }
        })
        .collect()
}

/// A mirror's `match` in the words `mirror add --match` takes (`proto udp to CIDR dport
/// 5000:5010`); the protocol `any` is what no match says, so it is left out.
fn describe_mirror_match(fields: &serde_json::Map<String, serde_json::Value>) -> String {
    [
        ("protocol", "proto"),
        ("source", "from"),
        ("destination", "to"),
        ("source_port", "sport"),
        ("destination_port", "dport"),
    ]
    .iter()
    .filter_map(|(field, word)| match fields.get(*field)? {
        serde_json::Value::String(text) if *field == "protocol" && text == "any" => None,
        serde_json::Value::String(text) => Some(format!("{word} {text}")),
        other => Some(format!("{word} {other}")),
    })
    .collect::<Vec<_>>()
    .join(" ")
}

fn network_id(name: &str) -> String {
    format!("net:{name}")
}

fn container_id(name: &str) -> String {
    format!("ctr:{name}")
}

/// A DOT string literal; `\n` in `text` becomes a line break in the label.
fn quote(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

fn health_colour(health: &str) -> &'static str {
    match health {
        "healthy" => "#c8ecc8",
        "unhealthy" => "#f6c6c6",
        _ => "#fbeebb",
    }
}

fn side_colour(sides: &[String]) -> &'static str {
    match sides.first().map(String::as_str) {
        Some("left") => "#2b6cb0",
        Some("right") => "#c05621",
        Some("mgmt") => "#718096",
        Some(_) => "#b7791f",
        None => "#555555",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> ChainGraph {
        ChainGraph {
            networks: vec![
                NetworkNode {
                    name: "left".into(),
                    subnet: Some("10.0.1.0/24".into()),
                    internal: true,
                },
                NetworkNode {
                    name: "right".into(),
                    subnet: None,
                    internal: false,
                },
            ],
            containers: vec![ContainerNode {
                name: "fw \"one\"".into(),
                image: "docknfv/dockwall:latest".into(),
                service_instance: Some("dockwall".into()),
                health: "healthy".into(),
                legs: vec![
                    Leg {
                        network: "left".into(),
                        address: Some("10.0.1.2/24".into()),
                        sides: vec!["left".into()],
                    },
                    Leg {
                        network: "right".into(),
                        address: None,
                        sides: vec!["right".into()],
                    },
                ],
                mirrors: vec![Mirror {
                    to: "10.0.3.9".into(),
                    what: "side left".into(),
                }],
            }],
        }
    }

    #[test]
    fn dot_has_a_node_per_network_and_container_and_an_edge_per_leg() {
        let dot = chain().to_dot();
        assert!(dot.contains("\"net:left\" [shape=ellipse"), "{dot}");
        assert!(dot.contains("\"net:right\" [shape=ellipse"), "{dot}");
        assert!(dot.contains("\"ctr:fw \\\"one\\\"\" [shape=box3d"), "{dot}");
        assert!(
            dot.contains("-- \"net:left\" [label=\"left\\n10.0.1.2/24\""),
            "{dot}"
        );
        assert_eq!(dot.matches(" -- \"net:").count(), 2, "{dot}");
        assert!(
            dot.contains("[style=dashed, label=\"mirror side left\"]"),
            "{dot}"
        );
    }

    #[test]
    fn sides_come_from_the_status_interfaces_by_mac() {
        let status = serde_json::json!({
            "routing": {"sides": [
                {"side": "left", "interface": {"mac": "02:42:0A:0B:01:02"}},
                {"side": "right", "interface": {"mac": "02:42:0a:0b:02:02"}},
                {"side": "mgmt", "interface": null}
            ]}
        });
        let sides = sides_from_status(&status);
        assert_eq!(sides["02:42:0a:0b:01:02"], ["left"]);
        assert_eq!(sides["02:42:0a:0b:02:02"], ["right"]);
        assert_eq!(sides.len(), 2);
    }

    #[test]
    fn a_mirrors_match_reads_as_the_mirror_add_words() {
        let status = serde_json::json!({"firewall": {"mirrors": [
            {"id": 1, "side": "left", "to": "10.0.3.9", "via": "right",
             "match": {"protocol": "udp", "destination": "192.168.20.0/24",
                       "destination_port": "5000:5010"}},
            {"id": 2, "side": "both", "to": "10.0.3.9", "via": "mgmt", "match": {"protocol": "any"}}
        ]}});
        let mirrors = mirrors_from_status(&status);
        assert_eq!(
            mirrors[0].what,
            "side left, match proto udp to 192.168.20.0/24 dport 5000:5010, via right"
        );
        assert_eq!(mirrors[1].what, "side both, via mgmt");
        assert_eq!(mirrors[1].to, "10.0.3.9");
    }
}

//! The deployment files under deploy/ checked without a cluster or a cloud.
//!
//! Kubernetes (deploy/kubernetes): every object deserializes into its k8s-openapi type and
//! serializes back to the same document — k8s-openapi ignores unknown fields, so a field
//! lost on the way is a typo or a field in the wrong place. NetworkAttachmentDefinitions (a
//! CRD) are checked as generic objects, with their CNI config against the CNI spec's
//! required keys. The SIs' Multus legs are pinned as their sides, the kustomization lists
//! every file and nothing else.
//!
//! OpenStack (deploy/openstack): every Heat template parses, has a known
//! `heat_template_version`, and every `get_resource` / `get_attr` / `get_param` /
//! `depends_on` reference resolves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

fn deploy_dir(part: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(part)
}

/// The `.yaml` files of a directory, sorted, with their text.
fn yaml_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("read {}: {error}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .yaml files in {}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
            (path, text)
        })
        .collect()
}

/// Every document of a multi-document YAML stream.
fn documents(path: &Path, text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{}: not YAML: {error}", path.display()))
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// The paths where `original` holds something that `round_trip` lacks or differs in.
fn lost_fields(original: &Value, round_trip: &Value, path: &str, lost: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            for (key, value) in a {
                let key_text = match key {
                    Value::String(text) => text.clone(),
                    other => format!("{other:?}"),
                };
                let child = format!("{path}.{key_text}");
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &child, lost),
                    None => lost.push(child),
                }
            }
        }
        (Value::Sequence(a), Value::Sequence(b)) if a.len() == b.len() => {
            for (index, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{index}]"), lost);
            }
        }
        (a, b) if a == b => {}
        (a, b) => lost.push(format!("{path} (was {a:?}, came back {b:?})")),
    }
}

/// Deserialize into `T`, serialize back: the fields that did not survive, by path.
fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Vec<String>, String> {
    let typed: T = serde_yaml::from_value(value.clone()).map_err(|error| error.to_string())?;
    let back = serde_yaml::to_value(&typed).map_err(|error| error.to_string())?;
    let mut lost = Vec::new();
    lost_fields(value, &back, "", &mut lost);
    // Only the original's fields count: a field the type adds on the way back is no loss.
    Ok(lost)
}

fn text_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// The kinds deploy/kubernetes may hold, each checked as its k8s-openapi type.
fn check_kubernetes_object(object: &Value) -> Result<Vec<String>, String> {
    let api_version = text_at(object, "apiVersion").ok_or("no apiVersion")?;
    let kind = text_at(object, "kind").ok_or("no kind")?;
    match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(object),
        ("v1", "PersistentVolumeClaim") => round_trip::<PersistentVolumeClaim>(object),
        ("v1", "Service") => round_trip::<Service>(object),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(object),
        ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition") => {
            check_network_attachment(object).map(|()| Vec::new())
        }
        _ => Err(format!(
            "{api_version} {kind}: not a kind this test knows; add its k8s-openapi type here"
        )),
    }
}

/// A NetworkAttachmentDefinition: metadata as ObjectMeta, spec with only `config`, and the
/// config a CNI network configuration (a single plugin or a list).
fn check_network_attachment(object: &Value) -> Result<(), String> {
    let allowed: BTreeSet<&str> = ["apiVersion", "kind", "metadata", "spec"].into();
    for key in object.as_mapping().ok_or("not a mapping")?.keys() {
        let key = key.as_str().unwrap_or_default();
        if !allowed.contains(key) {
            return Err(format!("unknown top-level field {key:?}"));
        }
    }
    let metadata = object.get("metadata").ok_or("no metadata")?;
    let lost = round_trip::<ObjectMeta>(metadata)?;
    if !lost.is_empty() {
        return Err(format!("metadata fields lost: {lost:?}"));
    }
    let spec = object
        .get("spec")
        .and_then(Value::as_mapping)
        .ok_or("no spec")?;
    if let Some(key) = spec.keys().find(|key| key.as_str() != Some("config")) {
        return Err(format!(
            "spec.{key:?}: a NetworkAttachmentDefinition's spec has only `config`"
        ));
    }
    let config = spec
        .get("config")
        .and_then(Value::as_str)
        .ok_or("spec.config is not a string of JSON")?;
    let config: serde_json::Value =
        serde_json::from_str(config).map_err(|error| format!("spec.config: not JSON: {error}"))?;
    check_cni_config(&config).map_err(|error| format!("spec.config: {error}"))?;
    let name = metadata.get("name").and_then(Value::as_str);
    if config["name"].as_str() != name {
        return Err(format!(
            "spec.config name {} differs from metadata.name {name:?}",
            config["name"]
        ));
    }
    Ok(())
}

/// The CNI spec's network configuration: `cniVersion` (a released version) and `name`, then
/// either one plugin (`type`) or `plugins`, each with a `type`; an `ipam` needs a `type`.
fn check_cni_config(config: &serde_json::Value) -> Result<(), String> {
    const CNI_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0"];
    let version = config["cniVersion"].as_str().ok_or("no cniVersion")?;
    if !CNI_VERSIONS.contains(&version) {
        return Err(format!(
            "cniVersion {version:?} is not one of {CNI_VERSIONS:?}"
        ));
    }
    config["name"].as_str().ok_or("no name")?;
    let plugins: Vec<&serde_json::Value> = match (&config["type"], &config["plugins"]) {
        (serde_json::Value::String(_), serde_json::Value::Null) => vec![config],
        (serde_json::Value::Null, serde_json::Value::Array(list)) if !list.is_empty() => {
            list.iter().collect()
        }
        _ => return Err("needs either `type` (one plugin) or a non-empty `plugins` list".into()),
    };
    for (index, plugin) in plugins.iter().enumerate() {
        let plugin_type = plugin["type"]
            .as_str()
            .ok_or(format!("plugin {index}: no type"))?;
        match &plugin["ipam"] {
            serde_json::Value::Null => {}
            ipam => {
                ipam["type"]
                    .as_str()
                    .ok_or(format!("plugin {index} ({plugin_type}): ipam has no type"))?;
            }
        }
    }
    Ok(())
}

/// Every object in deploy/kubernetes, by file, except the kustomization.
fn kubernetes_objects() -> Vec<(PathBuf, Value)> {
    objects_in(&deploy_dir("kubernetes"))
}

/// The transparent overlay's objects: its networks and its patch of Dockwall's Deployment.
fn transparent_objects() -> Vec<(PathBuf, Value)> {
    objects_in(&deploy_dir("kubernetes").join("transparent"))
}

fn objects_in(dir: &Path) -> Vec<(PathBuf, Value)> {
    yaml_files(dir)
        .into_iter()
        .filter(|(path, _)| !path.ends_with("kustomization.yaml"))
        .flat_map(|(path, text)| {
            documents(&path, &text)
                .into_iter()
                .map(move |object| (path.clone(), object))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn kubernetes_objects_round_trip_through_their_types() {
    let objects = kubernetes_objects();
    let mut everything = objects.clone();
    everything.extend(transparent_objects());
    let mut failures = Vec::new();
    for (path, object) in &everything {
        let name = object["metadata"]["name"].as_str().unwrap_or("?");
        for problem in enum_value_problems(object, "", "") {
            failures.push(format!("{} {name}: {problem}", path.display()));
        }
        match check_kubernetes_object(object) {
            Ok(lost) if lost.is_empty() => {}
            Ok(lost) => failures.push(format!(
                "{} {name}: fields lost in the round trip (unknown or misplaced): {lost:?}",
                path.display()
            )),
            Err(error) => failures.push(format!("{} {name}: {error}", path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let kinds: BTreeSet<&str> = objects
        .iter()
        .filter_map(|(_, object)| text_at(object, "kind"))
        .collect();
    for kind in [
        "Namespace",
        "NetworkAttachmentDefinition",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/kubernetes");
    }
}

#[test]
fn the_round_trip_catches_a_misspelt_field() {
    let deployment: Value = serde_yaml::from_str(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {}\n  template:\n    spec:\n      containers:\n        - name: x\n          imagePullPolicyy: Always\n",
    )
    .expect("YAML");
    let lost = check_kubernetes_object(&deployment).expect("a Deployment");
    assert_eq!(
        lost,
        [".spec.template.spec.containers[0].imagePullPolicyy"],
        "the misspelt field is not reported"
    );
}

#[test]
fn cni_configs_missing_required_keys_are_refused() {
    for (config, why) in [
        (r#"{"name": "x", "type": "bridge"}"#, "no cniVersion"),
        (r#"{"cniVersion": "0.4.0", "type": "bridge"}"#, "no name"),
        (r#"{"cniVersion": "0.4.0", "name": "x"}"#, "no type/plugins"),
        (
            r#"{"cniVersion": "0.4.0", "name": "x", "type": "bridge", "ipam": {}}"#,
            "ipam without type",
        ),
        (
            r#"{"cniVersion": "0.4.0", "name": "x", "plugins": [{"ipam": {"type": "static"}}]}"#,
            "plugin without type",
        ),
    ] {
        let config = serde_json::from_str(config).expect("JSON");
        assert!(check_cni_config(&config).is_err(), "accepted: {why}");
    }
}

/// The value of env `name` in a container, if set.
fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|entry| entry["name"].as_str() == Some(name))
        .and_then(|entry| entry["value"].as_str())
}

#[test]
fn service_instances_pin_their_multus_legs_as_sides() {
    let objects = kubernetes_objects();
    let networks: BTreeSet<&str> = objects
        .iter()
        .filter(|(_, object)| text_at(object, "kind") == Some("NetworkAttachmentDefinition"))
        .filter_map(|(_, object)| object["metadata"]["name"].as_str())
        .collect();
    let deployments: Vec<&Value> = objects
        .iter()
        .map(|(_, object)| object)
        .filter(|object| text_at(object, "kind") == Some("Deployment"))
        .collect();
    assert_eq!(deployments.len(), 2, "Dockwall and Dockvpn");
    for deployment in deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap_or("?");
        let template = &deployment["spec"]["template"];
        let annotation = template["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no k8s.v1.cni.cncf.io/networks annotation"));
        let legs: Vec<serde_json::Value> = serde_json::from_str(annotation)
            .unwrap_or_else(|error| panic!("{name}: the networks annotation is not JSON: {error}"));
        let mut interfaces = BTreeMap::new();
        for leg in &legs {
            let network = leg["name"].as_str().expect("a leg names its network");
            assert!(
                networks.contains(network),
                "{name}: network {network} has no NetworkAttachmentDefinition"
            );
            let interface = leg["interface"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: leg {network} does not name its interface"));
            interfaces.insert(interface.to_owned(), network.to_owned());
        }
        let container = &template["spec"]["containers"][0];
        let pins = [
            ("VNF_LEFT", "net1"),
            ("VNF_RIGHT", "net2"),
            ("VNF_MGMT", "eth0"),
        ];
        for (variable, interface) in pins {
            assert_eq!(
                env_value(container, variable),
                Some(format!("name:{interface}").as_str()),
                "{name}: {variable} must pin {interface}, or order of appearance makes eth0 (the cluster network) the left side"
            );
        }
        assert_eq!(
            interfaces.keys().map(String::as_str).collect::<Vec<_>>(),
            ["net1", "net2"],
            "{name}: the Multus legs must be net1 (left) and net2 (right)"
        );
        let capabilities = &container["securityContext"]["capabilities"]["add"];
        assert!(
            capabilities
                .as_sequence()
                .is_some_and(|list| list.iter().any(|c| c.as_str() == Some("NET_ADMIN"))),
            "{name}: no NET_ADMIN"
        );
        let sysctls: BTreeSet<&str> = template["spec"]["securityContext"]["sysctls"]
            .as_sequence()
            .map(|list| list.iter().filter_map(|s| s["name"].as_str()).collect())
            .unwrap_or_default();
        for sysctl in [
            "net.ipv4.ip_forward",
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.fwmark_reflect",
        ] {
            assert!(sysctls.contains(sysctl), "{name}: sysctl {sysctl} not set");
        }
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["exec"]["command"],
                serde_yaml::to_value([name, "status"]).expect("YAML"),
                "{name}: {probe} must exec `{name} status`"
            );
        }
        assert!(
            failing_time(&container["livenessProbe"]) > failing_time(&container["readinessProbe"]),
            "{name}: liveness must tolerate longer failures than readiness"
        );
    }
}

/// How long a probe fails in a row before it gives up on the container, in seconds
/// (Kubernetes' defaults: every 10 s, 3 failures).
fn failing_time(probe: &Value) -> u64 {
    let field = |key: &str, default: u64| probe[key].as_u64().unwrap_or(default);
    field("periodSeconds", 10) * field("failureThreshold", 3)
}

/// The values Kubernetes accepts for the enum-like string fields the manifests use: k8s-openapi
/// types them as plain strings, so a typo (`protocol: udp`) survives the round trip.
fn enum_value_problems(value: &Value, parent: &str, path: &str) -> Vec<String> {
    const ALLOWED: [(&str, &str, &[&str]); 8] = [
        ("", "protocol", &["TCP", "UDP", "SCTP"]),
        ("", "imagePullPolicy", &["Always", "IfNotPresent", "Never"]),
        ("", "restartPolicy", &["Always", "OnFailure", "Never"]),
        (
            "",
            "accessModes",
            &[
                "ReadWriteOnce",
                "ReadOnlyMany",
                "ReadWriteMany",
                "ReadWriteOncePod",
            ],
        ),
        ("", "externalTrafficPolicy", &["Cluster", "Local"]),
        ("strategy", "type", &["Recreate", "RollingUpdate"]),
        (
            "hostPath",
            "type",
            &[
                "",
                "DirectoryOrCreate",
                "Directory",
                "FileOrCreate",
                "File",
                "Socket",
                "CharDevice",
                "BlockDevice",
            ],
        ),
        (
            "spec",
            "type",
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
        ),
    ];
    let mut problems = Vec::new();
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                let key = key.as_str().unwrap_or_default();
                let child_path = format!("{path}.{key}");
                let allowed = ALLOWED
                    .iter()
                    .find(|(on, field, _)| *field == key && (on.is_empty() || *on == parent));
                // A Service's `spec.type`; a Deployment's spec has no `type`.
                let values: Vec<&Value> = match child {
                    Value::Sequence(list) => list.iter().collect(),
                    other => vec![other],
                };
                if let Some((_, _, allowed)) = allowed {
                    for value in values {
                        if !value.as_str().is_some_and(|text| allowed.contains(&text)) {
                            problems
                                .push(format!("{child_path}: {value:?} is not one of {allowed:?}"));
                        }
                    }
                } else {
                    problems.extend(enum_value_problems(child, key, &child_path));
                }
            }
        }
        Value::Sequence(list) => {
            for (index, item) in list.iter().enumerate() {
                problems.extend(enum_value_problems(
                    item,
                    parent,
                    &format!("{path}[{index}]"),
                ));
            }
        }
        _ => {}
    }
    problems
}

#[test]
fn enum_like_values_outside_their_allowlist_are_refused() {
    let service: Value = serde_yaml::from_str(
        "spec:\n  type: LoadBalancer\n  ports: [{port: 1, protocol: udp}]\n  strategy: {type: Recreate}\n",
    )
    .expect("YAML");
    let problems = enum_value_problems(&service, "", "");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with(".spec.ports[0].protocol"),
        "{problems:?}"
    );
}

/// A NetworkAttachmentDefinition's CNI config, by name.
fn cni_configs(objects: &[(PathBuf, Value)]) -> BTreeMap<String, serde_json::Value> {
    objects
        .iter()
        .filter(|(_, object)| text_at(object, "kind") == Some("NetworkAttachmentDefinition"))
        .filter_map(|(_, object)| {
            let name = object["metadata"]["name"].as_str()?.to_owned();
            let config = serde_json::from_str(object["spec"]["config"].as_str()?).ok()?;
            Some((name, config))
        })
        .collect()
}

/// The plugins of a CNI config (one plugin, or a `plugins` list).
fn cni_plugins(config: &serde_json::Value) -> Vec<&serde_json::Value> {
    match config["plugins"].as_array() {
        Some(list) => list.iter().collect(),
        None => vec![config],
    }
}

/// Why the legs of a Deployment do not fit the networks they are on: a leg the SI leases
/// itself (VNF_DHCP) or bridges (transparent Dockwall) needs a network without CNI IPAM, and
/// (for DHCP) a pinned MAC the network lets the pod set; every other leg needs IPAM, and
/// static IPAM needs the leg's `ips`, which the network must accept (`capabilities.ips`).
/// Records the networks without IPAM that a leg may use in `unaddressed_uses`.
fn leg_problems(
    deployment: &Value,
    networks: &BTreeMap<String, serde_json::Value>,
    unaddressed_uses: &mut BTreeSet<String>,
) -> Vec<String> {
    let name = deployment["metadata"]["name"].as_str().unwrap_or("?");
    let template = &deployment["spec"]["template"];
    let container = &template["spec"]["containers"][0];
    let mut problems = Vec::new();
    let Some(annotation) =
        template["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"].as_str()
    else {
        return vec![format!("{name}: no k8s.v1.cni.cncf.io/networks annotation")];
    };
    let legs: Vec<serde_json::Value> = match serde_json::from_str(annotation) {
        Ok(legs) => legs,
        Err(error) => return vec![format!("{name}: networks annotation: {error}")],
    };
    let dhcp_side = env_value(container, "VNF_DHCP");
    let transparent = env_value(container, "DOCKWALL_MODE") == Some("transparent");
    for leg in &legs {
        let network = leg["name"].as_str().unwrap_or("?");
        let interface = leg["interface"].as_str().unwrap_or("?");
        let place = format!("{name} leg {interface} on {network}");
        let Some(config) = networks.get(network) else {
            problems.push(format!("{place}: no such NetworkAttachmentDefinition"));
            continue;
        };
        let plugins = cni_plugins(config);
        let ipam_type = plugins
            .iter()
            .find_map(|plugin| plugin["ipam"]["type"].as_str());
        let capability = |key: &str| {
            plugins
                .iter()
                .any(|plugin| plugin["capabilities"][key].as_bool() == Some(true))
        };
        let side = ["left", "right"].into_iter().find(|side| {
            env_value(container, &format!("VNF_{}", side.to_uppercase()))
                == Some(format!("name:{interface}").as_str())
        });
        let leased_by_the_si = side.is_some() && side == dhcp_side;
        let bridged = transparent && side.is_some();
        if leased_by_the_si || bridged {
            unaddressed_uses.insert(network.to_owned());
            if let Some(ipam) = ipam_type {
                problems.push(format!(
                    "{place}: the SI {} this leg itself, so the network must have no CNI ipam (has {ipam:?})",
                    if bridged { "bridges" } else { "leases (VNF_DHCP)" }
                ));
            }
            if leg.get("ips").is_some() {
                problems.push(format!("{place}: `ips` on a leg that CNI does not address"));
            }
        }
        if leased_by_the_si && !(leg["mac"].is_string() && capability("mac")) {
            problems.push(format!(
                "{place}: a DHCP leg needs a pinned \"mac\" (and capabilities.mac on the network) for the server's host reservation"
            ));
        }
        if bridged
            && !plugins
                .iter()
                .all(|plugin| matches!(plugin["type"].as_str(), Some("bridge" | "host-device")))
        {
            problems.push(format!(
                "{place}: a transparent leg must be a bridge or host-device port (a macvlan receives only its own MAC's frames)"
            ));
        }
        if !(leased_by_the_si || bridged) {
            match ipam_type {
                None => problems.push(format!(
                    "{place}: the network has no ipam, so the leg gets no address"
                )),
                Some("static") => {
                    let ips: Vec<&str> = leg["ips"]
                        .as_array()
                        .map(|list| list.iter().filter_map(|ip| ip.as_str()).collect())
                        .unwrap_or_default();
                    if ips.is_empty() {
                        problems.push(format!(
                            "{place}: static ipam needs a non-empty \"ips\" list"
                        ));
                    }
                    for ip in ips {
                        if !is_cidr(ip) {
                            problems
                                .push(format!("{place}: ips {ip:?} is not an address/prefix CIDR"));
                        }
                    }
                    if !capability("ips") {
                        problems.push(format!("{place}: the network lacks capabilities.ips, so the leg's ips are ignored"));
                    }
                }
                Some(_) => {}
            }
        }
    }
    problems
}

/// `address/prefix`, IPv4 or IPv6, with the prefix inside the address's length.
fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let bits = match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return false,
    };
    prefix.parse::<u8>().is_ok_and(|prefix| prefix <= bits)
}

/// The Deployment `base` with the transparent overlay's patch applied as kustomize would:
/// the networks annotation replaced, env entries replaced by name.
fn patched(base: &Value, patch: &Value) -> Value {
    let mut deployment = base.clone();
    let annotation = "k8s.v1.cni.cncf.io/networks";
    deployment["spec"]["template"]["metadata"]["annotations"][annotation] =
        patch["spec"]["template"]["metadata"]["annotations"][annotation].clone();
    let patched_env = patch["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence_mut()
        .expect("the base Deployment has env");
    for entry in patched_env {
        env.retain(|old| old["name"] != entry["name"]);
        env.push(entry);
    }
    deployment
}

#[test]
fn every_leg_fits_its_network() {
    let objects = kubernetes_objects();
    let transparent = transparent_objects();
    let mut all = objects.clone();
    all.extend(transparent.iter().cloned());
    let networks = cni_configs(&all);
    let deployments = |objects: &[(PathBuf, Value)]| -> Vec<Value> {
        objects
            .iter()
            .filter(|(_, object)| text_at(object, "kind") == Some("Deployment"))
            .map(|(_, object)| object.clone())
            .collect()
    };
    let base = deployments(&objects);
    let patch = deployments(&transparent);
    assert_eq!(
        patch.len(),
        1,
        "the transparent overlay patches one Deployment"
    );
    let patch_name = &patch[0]["metadata"]["name"];
    let dockwall = base
        .iter()
        .find(|deployment| &deployment["metadata"]["name"] == patch_name)
        .expect("the patched Deployment exists in deploy/kubernetes");
    let transparent_dockwall = patched(dockwall, &patch[0]);
    assert_eq!(
        env_value(
            &transparent_dockwall["spec"]["template"]["spec"]["containers"][0],
            "DOCKWALL_MODE"
        ),
        Some("transparent")
    );
    let mut unaddressed_uses = BTreeSet::new();
    let mut problems = Vec::new();
    for deployment in base.iter().chain([&transparent_dockwall]) {
        problems.extend(leg_problems(deployment, &networks, &mut unaddressed_uses));
    }
    // A missing ipam is right only for networks whose legs the SI leases or bridges itself.
    for (name, config) in &networks {
        let has_ipam = cni_plugins(config)
            .iter()
            .any(|plugin| !plugin["ipam"].is_null());
        if !has_ipam && !unaddressed_uses.contains(name) {
            problems.push(format!(
                "network {name}: no ipam, but no leg on it is leased (VNF_DHCP) or bridged (transparent) by its SI"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let overlay: Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy_dir("kubernetes").join("transparent/kustomization.yaml"))
            .expect("transparent/kustomization.yaml"),
    )
    .expect("YAML");
    assert_eq!(
        overlay["resources"],
        serde_yaml::to_value(["..", "networks.yaml"]).expect("YAML"),
        "the transparent overlay builds on deploy/kubernetes and adds its networks"
    );
    assert_eq!(
        overlay["patches"][0]["path"].as_str(),
        Some("dockwall-transparent.yaml")
    );
}

#[test]
fn legs_that_do_not_fit_their_network_are_reported() {
    let networks: BTreeMap<String, serde_json::Value> = [
        (
            "dhcp",
            r#"{"type": "macvlan", "capabilities": {"mac": true}, "ipam": {"type": "dhcp"}}"#,
        ),
        (
            "static",
            r#"{"type": "macvlan", "ipam": {"type": "static"}}"#,
        ),
    ]
    .into_iter()
    .map(|(name, config)| (name.to_owned(), serde_json::from_str(config).expect("JSON")))
    .collect();
    let deployment: Value = serde_yaml::from_str(
        r#"metadata: {name: vpn}
spec:
  template:
    metadata:
      annotations:
        k8s.v1.cni.cncf.io/networks: '[{"name": "dhcp", "interface": "net1", "mac": "02:00:00:00:00:01"}, {"name": "static", "interface": "net2", "ips": ["10.0.0.300/24"]}]'
    spec:
      containers:
        - env:
            - {name: VNF_LEFT, value: "name:net1"}
            - {name: VNF_RIGHT, value: "name:net2"}
            - {name: VNF_DHCP, value: left}
"#,
    )
    .expect("YAML");
    let problems = leg_problems(&deployment, &networks, &mut BTreeSet::new()).join(
        "
",
    );
    for expected in [
        "must have no CNI ipam",
        "is not an address/prefix CIDR",
        "lacks capabilities.ips",
    ] {
        assert!(
            problems.contains(expected),
            "{expected} not reported in:
{problems}"
        );
    }
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let dir = deploy_dir("kubernetes");
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
    let kustomization: Value = serde_yaml::from_str(&text).expect("kustomization YAML");
    assert_eq!(
        text_at(&kustomization, "kind"),
        Some("Kustomization"),
        "kustomization.yaml kind"
    );
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources list")
        .iter()
        .map(|resource| resource.as_str().expect("a file name").to_owned())
        .collect();
    for resource in &listed {
        assert!(
            dir.join(resource).is_file(),
            "kustomization resource {resource} does not exist"
        );
    }
    let files: BTreeSet<String> = yaml_files(&dir)
        .into_iter()
        .filter_map(|(path, _)| Some(path.file_name()?.to_str()?.to_owned()))
        .filter(|file| file != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, files,
        "the kustomization must list exactly the manifests"
    );
}

/// Heat's template versions (the dated ones and the release names that alias them).
const HEAT_TEMPLATE_VERSIONS: [&str; 17] = [
    "2013-05-23",
    "2014-10-16",
    "2015-04-30",
    "2015-10-15",
    "2016-04-08",
    "2016-10-14",
    "2017-02-24",
    "2017-09-01",
    "2018-03-02",
    "2018-08-31",
    "2021-04-16",
    "newton",
    "ocata",
    "pike",
    "queens",
    "rocky",
    "wallaby",
];

/// Parameters Heat defines for every stack.
const HEAT_PSEUDO_PARAMETERS: [&str; 4] = [
    "OS::stack_name",
    "OS::stack_id",
    "OS::project_id",
    "OS::region_name",
];

/// One reference an intrinsic function or a resource attribute makes.
#[derive(Debug)]
enum HeatReference {
    Resource(String),
    Parameter(String),
    Condition(String),
}

/// The references in `value`: `get_resource`, `get_attr`, `get_param`, and the condition
/// names of `if`.
fn heat_references(value: &Value, found: &mut Vec<HeatReference>) {
    match value {
        Value::Mapping(map) => {
            for (key, argument) in map {
                let first = || match argument {
                    Value::Sequence(list) => list.first().and_then(Value::as_str),
                    other => other.as_str(),
                };
                let name = first().unwrap_or_default().to_owned();
                match key.as_str() {
                    Some("get_resource" | "get_attr") => found.push(HeatReference::Resource(name)),
                    Some("get_param") => found.push(HeatReference::Parameter(name)),
                    Some("if") => found.push(HeatReference::Condition(name)),
                    _ => {}
                }
                heat_references(argument, found);
            }
        }
        Value::Sequence(list) => list.iter().for_each(|item| heat_references(item, found)),
        _ => {}
    }
}

fn names_in(list: &Value) -> Vec<String> {
    match list {
        Value::String(name) => vec![name.clone()],
        Value::Sequence(names) => names
            .iter()
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// The names a Heat template defines, for resolving its references.
struct HeatNames {
    parameters: BTreeSet<String>,
    resources: BTreeSet<String>,
    conditions: BTreeSet<String>,
}

impl HeatNames {
    /// Reports the references in `value` that resolve to nothing; records the parameters
    /// used and, for a resource, the resources it depends on.
    fn check(
        &self,
        place: &str,
        value: &Value,
        problems: &mut Vec<String>,
        used_parameters: &mut BTreeSet<String>,
        mut depends: Option<&mut BTreeSet<String>>,
    ) {
        let mut found = Vec::new();
        heat_references(value, &mut found);
        for reference in found {
            match reference {
                HeatReference::Resource(name) if self.resources.contains(&name) => {
                    if let Some(depends) = depends.as_deref_mut() {
                        depends.insert(name);
                    }
                }
                HeatReference::Resource(name) => problems.push(format!(
                    "{place}: get_resource/get_attr {name:?}: no such resource"
                )),
                HeatReference::Parameter(name) => {
                    if self.parameters.contains(&name) {
                        used_parameters.insert(name);
                    } else if !HEAT_PSEUDO_PARAMETERS.contains(&name.as_str()) {
                        problems.push(format!("{place}: get_param {name:?}: no such parameter"));
                    }
                }
                HeatReference::Condition(name) if self.conditions.contains(&name) => {}
                HeatReference::Condition(name) => {
                    problems.push(format!("{place}: if {name:?}: no such condition"))
                }
            }
        }
    }
}

/// What is wrong with a Heat template: its version, its sections, every reference, unused
/// parameters, defaults outside their allowed values, and dependency cycles.
fn heat_template_problems(template: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let sections: BTreeSet<&str> = [
        "heat_template_version",
        "description",
        "parameter_groups",
        "parameters",
        "resources",
        "outputs",
        "conditions",
    ]
    .into();
    let Some(top) = template.as_mapping() else {
        return vec!["not a mapping".into()];
    };
    for key in top.keys() {
        let key = key.as_str().unwrap_or_default();
        if !sections.contains(key) {
            problems.push(format!("unknown section {key:?}"));
        }
    }
    let version = match &template["heat_template_version"] {
        Value::String(text) => text.clone(),
        // An unquoted date parses as a string in YAML 1.2; keep other scalars readable.
        other => format!("{other:?}"),
    };
    if !HEAT_TEMPLATE_VERSIONS.contains(&version.as_str()) {
        problems.push(format!(
            "heat_template_version {version} is not one of {HEAT_TEMPLATE_VERSIONS:?}"
        ));
    }
    let keys = |section: &str| -> BTreeSet<String> {
        template[section]
            .as_mapping()
            .map(|map| {
                map.keys()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let parameters = keys("parameters");
    let resources = keys("resources");
    let conditions = keys("conditions");
    if resources.is_empty() {
        problems.push("no resources".into());
    }
    let resource_keys: BTreeSet<&str> = [
        "type",
        "properties",
        "metadata",
        "depends_on",
        "update_policy",
        "deletion_policy",
        "external_id",
        "condition",
    ]
    .into();
    let names = HeatNames {
        parameters,
        resources,
        conditions,
    };
    let mut used_parameters = BTreeSet::new();
    let mut dependencies: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, resource) in template["resources"].as_mapping().into_iter().flatten() {
        let name = name.as_str().unwrap_or_default().to_owned();
        let place = format!("resource {name}");
        let mut depends = BTreeSet::new();
        for key in resource.as_mapping().into_iter().flat_map(|map| map.keys()) {
            let key = key.as_str().unwrap_or_default();
            if !resource_keys.contains(key) {
                problems.push(format!("{place}: unknown key {key:?}"));
            }
        }
        if resource["type"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{place}: no type"));
        }
        for dependency in names_in(&resource["depends_on"]) {
            if names.resources.contains(&dependency) {
                depends.insert(dependency);
            } else {
                problems.push(format!(
                    "{place}: depends_on {dependency:?}: no such resource"
                ));
            }
        }
        for condition in names_in(&resource["condition"]) {
            if !names.conditions.contains(&condition) {
                problems.push(format!(
                    "{place}: condition {condition:?}: no such condition"
                ));
            }
        }
        names.check(
            &place,
            &resource["properties"],
            &mut problems,
            &mut used_parameters,
            Some(&mut depends),
        );
        dependencies.insert(name, depends);
    }
    for (name, output) in template["outputs"].as_mapping().into_iter().flatten() {
        let place = format!("output {}", name.as_str().unwrap_or_default());
        names.check(&place, output, &mut problems, &mut used_parameters, None);
    }
    names.check(
        "conditions",
        &template["conditions"],
        &mut problems,
        &mut used_parameters,
        None,
    );
    for unused in names.parameters.difference(&used_parameters) {
        problems.push(format!(
            "parameter {unused} is never used (a misspelt get_param?)"
        ));
    }
    for (name, parameter) in template["parameters"].as_mapping().into_iter().flatten() {
        let allowed = parameter["constraints"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find_map(|constraint| constraint["allowed_values"].as_sequence());
        if let (Some(allowed), Some(default)) = (allowed, parameter.get("default")) {
            if !allowed.contains(default) {
                problems.push(format!(
                    "parameter {}: default {default:?} is not an allowed value",
                    name.as_str().unwrap_or_default()
                ));
            }
        }
    }
    if let Some(cycle) = dependency_cycle(&dependencies) {
        problems.push(format!("circular dependency: {}", cycle.join(" → ")));
    }
    problems
}

/// A cycle among the resources' dependencies, if any (Heat refuses such a template).
fn dependency_cycle(dependencies: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        dependencies: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in dependencies.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, dependencies, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    dependencies
        .keys()
        .find_map(|node| visit(node, dependencies, &mut Vec::new(), &mut done))
}

#[test]
fn heat_templates_parse_and_every_reference_resolves() {
    let mut failures = Vec::new();
    for (path, text) in yaml_files(&deploy_dir("openstack")) {
        let template: Value = match serde_yaml::from_str(&text) {
            Ok(template) => template,
            Err(error) => {
                failures.push(format!("{}: not YAML: {error}", path.display()));
                continue;
            }
        };
        for problem in heat_template_problems(&template) {
            failures.push(format!("{}: {problem}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_service_mode_parameter_offers_exactly_dockwalls_modes() {
    let path = deploy_dir("openstack").join("service-chain.yaml");
    let template: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).expect("service-chain.yaml"))
            .expect("YAML");
    let allowed = &template["parameters"]["service_mode"]["constraints"][0]["allowed_values"];
    assert_eq!(
        *allowed,
        serde_yaml::to_value(["in-network", "in-network-nat", "transparent"]).expect("YAML"),
        "Contrail's service modes are Dockwall's --mode values"
    );
    let environment = &template["resources"]["dockwall"]["properties"]["environment"];
    assert_eq!(
        environment["DOCKWALL_MODE"]["get_param"].as_str(),
        Some("service_mode"),
        "Dockwall's mode must follow the service template's"
    );
}

#[test]
fn heat_starts_no_container_unless_asked() {
    let path = deploy_dir("openstack").join("service-chain.yaml");
    let template: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).expect("service-chain.yaml"))
            .expect("YAML");
    // OS::Zun::Container cannot ask for a privileged container, without which the SIs
    // crash-loop: they are created only when the operator says so.
    assert_eq!(
        template["parameters"]["create_containers"]["default"],
        Value::Bool(false)
    );
    assert_eq!(
        template["conditions"]["containers"]["get_param"].as_str(),
        Some("create_containers")
    );
    for (name, resource) in template["resources"].as_mapping().expect("resources") {
        if resource["type"].as_str() == Some("OS::Zun::Container") {
            assert_eq!(
                resource["condition"].as_str(),
                Some("containers"),
                "{name:?}: a Zun container without the create_containers condition"
            );
        }
    }
    for port in [
        "dockwall_left_port",
        "dockwall_right_port",
        "dockvpn_left_port",
        "dockvpn_right_port",
    ] {
        assert_eq!(
            template["outputs"][port]["value"]["get_resource"].as_str(),
            Some(port),
            "output {port}: the port `appcontainer run --net port=…` needs"
        );
    }
}

#[test]
fn the_heat_check_catches_broken_references() {
    let template: Value = serde_yaml::from_str(
        "heat_template_version: 2018-08-31
parameters:
  unused: {type: string}
resources:
  a:
    type: OS::Neutron::Net
    properties: {name: {get_param: missing}}
    depends_on: [b]
  b:
    type: OS::Neutron::Port
    properties: {network: {get_resource: a}, x: {get_attr: [nowhere, id]}}
",
    )
    .expect("YAML");
    let problems = heat_template_problems(&template).join("\n");
    for expected in [
        "get_param \"missing\"",
        "\"nowhere\": no such resource",
        "parameter unused is never used",
        "circular dependency",
    ] {
        assert!(
            problems.contains(expected),
            "{expected} not reported in:\n{problems}"
        );
    }
    let dated: Value =
        serde_yaml::from_str("heat_template_version: 2019-01-01\nresources: {}").expect("YAML");
    assert!(
        heat_template_problems(&dated)
            .join("\n")
            .contains("heat_template_version"),
        "an unknown version passes"
    );
}

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
        return Err(format!("spec.{key:?}: a NetworkAttachmentDefinition's spec has only `config`"));
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
        return Err(format!("cniVersion {version:?} is not one of {CNI_VERSIONS:?}"));
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
    yaml_files(&deploy_dir("kubernetes"))
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
    let mut failures = Vec::new();
    for (path, object) in &objects {
        let name = object["metadata"]["name"].as_str().unwrap_or("?");
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
        let pins = [("VNF_LEFT", "net1"), ("VNF_RIGHT", "net2"), ("VNF_MGMT", "eth0")];
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
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["exec"]["command"],
                serde_yaml::to_value([name, "status"]).expect("YAML"),
                "{name}: {probe} must exec `{name} status`"
            );
        }
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
    assert_eq!(listed, files, "the kustomization must list exactly the manifests");
}

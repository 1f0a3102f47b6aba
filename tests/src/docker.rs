//! The service chain on a real Docker engine, driven with bollard: two internal networks (the
//! left and right VNs), SIs started the way an orchestrator does — `docker run` on the left
//! network, then `docker network connect` to the right one — and hosts whose routes send
//! traffic between the VNs through the SI (what Contrail's route leaking does). Everything
//! the chain creates carries its labels and is removed on drop, also when a test panics; a
//! run killed by Ctrl-C is cleaned up by the next one (labels name the owning pid).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{
    ContainerCreateBody, DeviceMapping, EndpointIpamConfig, EndpointSettings, ExecConfig,
    HostConfig, Ipam, IpamConfig, NetworkConnectRequest, NetworkCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;

const OWNER_LABEL: &str = "docknfv.test.pid";
const CHAIN_LABEL: &str = "docknfv.test.chain";
/// The network option naming its Linux bridge, which the DOCKER-USER allowance refers to.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";

/// The images `cargo xtask images` builds.
pub const DOCKWALL_IMAGE: &str = "docknfv/dockwall:latest";
pub const DOCKVPN_IMAGE: &str = "docknfv/dockvpn:latest";
pub const DNSMASQ_IMAGE: &str = "docknfv/dnsmasq:latest";
pub const HOST_IMAGE: &str = "docknfv/host:latest";
/// Prometheus, as the compose chain runs it.
pub const PROMETHEUS_IMAGE: &str = "docknfv/prometheus:latest";

/// What to start: `docker run` with these settings on one network.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// Suffix of the container name (the chain's prefix comes first).
    pub name: String,
    pub image: String,
    pub network: String,
    pub address: String,
    pub mac: Option<String>,
    pub cap_add: Vec<String>,
    pub sysctls: Vec<(String, String)>,
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub tun_device: bool,
    /// A named volume (created for the chain, removed with it) and where it is mounted.
    pub volume: Option<String>,
}

impl Spec {
    pub fn new(name: &str, image: &str, network: &str, address: &str) -> Spec {
        Spec {
            name: name.into(),
            image: image.into(),
            network: network.into(),
            address: address.into(),
            ..Spec::default()
        }
    }

    /// An SI: NET_ADMIN and the forwarding sysctls, as documented for `docker run`.
    pub fn service_instance(name: &str, image: &str, network: &str, address: &str) -> Spec {
        Spec {
            cap_add: vec!["NET_ADMIN".into()],
            sysctls: vec![
                ("net.ipv4.ip_forward".into(), "1".into()),
                ("net.ipv4.conf.all.rp_filter".into(), "2".into()),
                ("net.ipv4.conf.default.rp_filter".into(), "2".into()),
                ("net.ipv4.fwmark_reflect".into(), "1".into()),
            ],
            ..Spec::new(name, image, network, address)
        }
    }

    pub fn with_cmd(mut self, cmd: &[&str]) -> Spec {
        self.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
        self
    }
}

/// A blocking Docker client for the tests and benchmarks: container operations on whatever
/// it is given, whoever created it (the chain below, or docker-compose).
pub struct DockerClient {
    runtime: tokio::runtime::Runtime,
    docker: Docker,
}

/// Two internal VNs (left, right) and whatever is run on them, removed on drop.
pub struct DockerChain {
    client: DockerClient,
    pub prefix: String,
    pub left: String,
    pub right: String,
    /// e.g. "10.201.4" for the left network 10.201.4.0/24.
    pub left_net: String,
    pub right_net: String,
}

impl std::ops::Deref for DockerChain {
    type Target = DockerClient;

    fn deref(&self) -> &DockerClient {
        &self.client
    }
}

impl DockerClient {
    /// Panics unless a Docker daemon answers and the chain images exist.
    pub fn connect() -> DockerClient {
        let client = DockerClient::connect_daemon().unwrap_or_else(|error| panic!("{error}"));
        client.block_on(async {
            for image in [
                DOCKWALL_IMAGE,
                DOCKVPN_IMAGE,
                DNSMASQ_IMAGE,
                HOST_IMAGE,
                PROMETHEUS_IMAGE,
            ] {
                if client.docker.inspect_image(image).await.is_err() {
                    panic!("image {image} is missing: run `cargo xtask images` (cargo xtask test does)");
                }
            }
        });
        client
    }

    /// A client of the local Docker daemon, once it answers (no images needed).
    pub fn connect_daemon() -> Result<DockerClient, String> {
        let docker =
            Docker::connect_with_local_defaults().map_err(|e| format!("no Docker client: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        runtime.block_on(docker.ping()).map_err(|error| {
            format!("the Docker daemon does not answer ({error}): install docker.io and start dockerd (cargo xtask test does both)")
        })?;
        Ok(DockerClient { runtime, docker })
    }

    /// The bollard client, for queries the helpers here do not cover.
    pub fn api(&self) -> &Docker {
        &self.docker
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// `docker exec CONTAINER CMD…`: exit code and combined output.
    pub fn exec(&self, container: &str, cmd: &[&str]) -> (i64, String) {
        self.run_exec(container, cmd, true)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// `docker exec CONTAINER CMD…`: exit code and standard output, or why it could not run.
    pub fn exec_stdout(&self, container: &str, cmd: &[&str]) -> Result<(i64, String), String> {
        self.run_exec(container, cmd, false)
    }

    fn run_exec(
        &self,
        container: &str,
        cmd: &[&str],
        with_stderr: bool,
    ) -> Result<(i64, String), String> {
        self.block_on(async {
            let exec = self
                .docker
                .create_exec(
                    container,
                    ExecConfig {
                        cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(with_stderr),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| format!("exec {cmd:?} in {container}: {e}"))?;
            let mut text = String::new();
            if let bollard::exec::StartExecResults::Attached { mut output, .. } = self
                .docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| format!("start exec {cmd:?} in {container}: {e}"))?
            {
                while let Some(Ok(chunk)) = output.next().await {
                    text.push_str(&chunk.to_string());
                }
            }
            let code = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .ok()
                .and_then(|i| i.exit_code)
                .unwrap_or(-1);
            Ok((code, text))
        })
    }

    /// Runs `cmd` in the container and panics with its output unless it succeeds.
    pub fn exec_ok(&self, container: &str, cmd: &[&str]) -> String {
        let (code, output) = self.exec(container, cmd);
        assert_eq!(code, 0, "{cmd:?} in {container}: {output}");
        output
    }

    pub fn logs(&self, container: &str) -> String {
        self.block_on(async {
            let options = LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .build();
            let mut stream = self.docker.logs(container, Some(options));
            let mut text = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                text.push_str(&chunk.to_string());
            }
            text
        })
    }

    pub fn wait_for_log(
        &self,
        container: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs(container);
            if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no log line with {needle:?} in {container} within {timeout:?}:\n{logs}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `cmd` in the container until its output contains `needle`; that output, or the
    /// last one.
    pub fn wait_for_output(
        &self,
        container: &str,
        cmd: &[&str],
        needle: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, output) = self.exec(container, cmd);
            if output.contains(needle) {
                return Ok(output);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{cmd:?} in {container} printed no {needle:?} within {timeout:?}:\n{output}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn state(&self, container: &str) -> bollard::models::ContainerState {
        self.block_on(self.docker.inspect_container(
            container,
            None::<bollard::query_parameters::InspectContainerOptions>,
        ))
        .unwrap_or_else(|e| panic!("inspect {container}: {e}"))
        .state
        .unwrap_or_default()
    }

    /// Waits until the HEALTHCHECK reports healthy; the logs on failure.
    pub fn wait_healthy(&self, container: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(container);
            let health = state.health.and_then(|h| h.status).map(|s| s.to_string());
            if health.as_deref() == Some("healthy") {
                return;
            }
            if Instant::now() >= deadline || state.running == Some(false) {
                panic!(
                    "{container} not healthy (health {health:?}, running {:?}); logs:\n{}",
                    state.running,
                    self.logs(container)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the container to stop by itself; its exit code.
    pub fn wait_exit(&self, container: &str, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(container);
            if state.running == Some(false) {
                return state.exit_code.unwrap_or(-1);
            }
            if Instant::now() >= deadline {
                panic!(
                    "{container} still running after {timeout:?}; logs:\n{}",
                    self.logs(container)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `docker restart` (SIGTERM, then start again with the same volume).
    pub fn restart(&self, container: &str) {
        self.block_on(self.docker.restart_container(
            container,
            None::<bollard::query_parameters::RestartContainerOptions>,
        ))
        .unwrap_or_else(|e| panic!("restart {container}: {e}"));
    }

    /// The container's main process as the host sees it.
    pub fn pid(&self, container: &str) -> u32 {
        self.state(container).pid.unwrap_or_default() as u32
    }

    /// `docker rm -f -v`.
    pub fn remove(&self, container: &str) {
        self.block_on(remove_container(&self.docker, container));
    }

    pub fn image_size(&self, image: &str) -> u64 {
        self.block_on(self.docker.inspect_image(image))
            .ok()
            .and_then(|i| i.size)
            .unwrap_or_default() as u64
    }

    pub fn ping(&self, container: &str, address: &str) -> bool {
        self.exec(container, &["ping", "-c", "1", "-W", "1", address])
            .0
            == 0
    }
}

impl DockerChain {
    pub fn new() -> DockerChain {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let client = DockerClient::connect();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        // Subnets unique per chain of this process; a stale chain holding one is removed first.
        let third = (2 * (n + pid * 3) % 250) as u8;
        let chain = DockerChain {
            client,
            prefix: format!("docknfv-{pid}-{n}"),
            left: format!("docknfv-{pid}-{n}-left"),
            right: format!("docknfv-{pid}-{n}-right"),
            left_net: format!("10.201.{third}"),
            right_net: format!("10.201.{}", third + 1),
        };
        remove_chains_on_interrupt();
        chain.remove_stale();
        for (name, net, bridge) in [
            (&chain.left, &chain.left_net, chain.bridge("l")),
            (&chain.right, &chain.right_net, chain.bridge("r")),
        ] {
            chain
                .block_on(chain.docker.create_network(NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".into()),
                    internal: Some(true),
                    options: Some(HashMap::from([(
                        BRIDGE_NAME_OPTION.to_owned(),
                        bridge.clone(),
                    )])),
                    ipam: Some(Ipam {
                        config: Some(vec![IpamConfig {
                            subnet: Some(format!("{net}.0/24")),
                            gateway: Some(format!("{net}.1")),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    labels: Some(chain.labels()),
                    ..Default::default()
                }))
                .unwrap_or_else(|e| panic!("create network {name}: {e}"));
            allow_routing_within(&bridge, true);
        }
        chain
    }

    /// An SI on the left network at `.2`, its sides pinned by subnet: Docker does not keep
    /// the order of a container's interfaces across `docker restart`.
    pub fn service_instance(&self, name: &str, image: &str) -> Spec {
        let mut spec =
            Spec::service_instance(name, image, &self.left, &format!("{}.2", self.left_net));
        spec.env = vec![
            format!("VNF_LEFT=cidr:{}.0/24", self.left_net),
            format!("VNF_RIGHT=cidr:{}.0/24", self.right_net),
        ];
        spec
    }

    /// A host at `.10` on `network` (subnet `net`.0/24) whose route to the VN `other`.0/24
    /// goes via the SI at `.2`, as route leaking would set it up; returns the container.
    pub fn host(&self, name: &str, network: &str, net: &str, other: &str) -> String {
        let route = format!("ip route add {other}.0/24 via {net}.2 && exec sleep infinity");
        let mut spec = Spec::new(name, HOST_IMAGE, network, &format!("{net}.10"))
            .with_cmd(&["sh", "-c", &route]);
        spec.cap_add = vec!["NET_ADMIN".into()];
        self.run(spec)
    }

    /// The Linux bridge of one of the chain's networks (named, so iptables can refer to it).
    fn bridge(&self, side: &str) -> String {
        let suffix = self.prefix.trim_start_matches("docknfv-").replace('-', "");
        format!("dn{side}{}", &suffix[suffix.len().saturating_sub(11)..])
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (OWNER_LABEL.to_owned(), std::process::id().to_string()),
            (CHAIN_LABEL.to_owned(), self.prefix.clone()),
        ])
    }

    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    /// `docker run -d` (create + start) of `spec`; returns the container name.
    pub fn run(&self, spec: Spec) -> String {
        let name = self.name(&spec.name);
        let mut endpoints = HashMap::new();
        endpoints.insert(
            spec.network.clone(),
            EndpointSettings {
                ipam_config: Some(EndpointIpamConfig {
                    ipv4_address: Some(spec.address.clone()),
                    ..Default::default()
                }),
                mac_address: spec.mac.clone(),
                ..Default::default()
            },
        );
        let binds = spec.volume.as_ref().map(|mount| {
            vec![format!(
                "{}:{mount}",
                self.name(&format!("{}-state", spec.name))
            )]
        });
        let host_config = HostConfig {
            network_mode: Some(spec.network.clone()),
            cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
            sysctls: (!spec.sysctls.is_empty()).then(|| spec.sysctls.iter().cloned().collect()),
            devices: spec.tun_device.then(|| {
                vec![DeviceMapping {
                    path_on_host: Some("/dev/net/tun".into()),
                    path_in_container: Some("/dev/net/tun".into()),
                    cgroup_permissions: Some("rwm".into()),
                }]
            }),
            binds,
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: (!spec.env.is_empty()).then(|| spec.env.clone()),
            cmd: spec.cmd.clone(),
            labels: Some(self.labels()),
            mac_address: spec.mac.clone(),
            host_config: Some(host_config),
            networking_config: Some(bollard::models::NetworkingConfig {
                endpoints_config: Some(endpoints),
            }),
            ..Default::default()
        };
        if spec.volume.is_some() {
            self.block_on(
                self.docker
                    .create_volume(bollard::models::VolumeCreateOptions {
                        name: Some(self.name(&format!("{}-state", spec.name))),
                        labels: Some(self.labels()),
                        ..Default::default()
                    }),
            )
            .unwrap_or_else(|e| panic!("create volume: {e}"));
        }
        self.block_on(async {
            self.docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                    body,
                )
                .await
                .unwrap_or_else(|e| panic!("create {name}: {e}"));
            self.docker
                .start_container(
                    &name,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
                .unwrap_or_else(|e| panic!("start {name}: {e}"));
        });
        name
    }

    /// `docker network connect NETWORK CONTAINER --ip ADDRESS`.
    pub fn connect(&self, container: &str, network: &str, address: &str) {
        self.block_on(self.docker.connect_network(
            network,
            NetworkConnectRequest {
                container: Some(container.into()),
                endpoint_config: Some(EndpointSettings {
                    ipam_config: Some(EndpointIpamConfig {
                        ipv4_address: Some(address.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
        ))
        .unwrap_or_else(|e| panic!("connect {container} to {network}: {e}"));
    }

    /// Removes what an earlier run left behind when its process is gone (killed).
    fn remove_stale(&self) {
        let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
        self.block_on(remove_labelled(&self.docker, OWNER_LABEL, |owner| {
            !owner.is_some_and(alive)
        }));
    }
}

/// On Ctrl-C or SIGTERM, removes every chain of this process (a signal skips the `Drop`s),
/// then exits 130. Installed once, by the first chain.
fn remove_chains_on_interrupt() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The handlers exist before `new` returns, so no chain is created unguarded.
        let mut terminate = runtime
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            })
            .expect("SIGTERM handler");
        let mut interrupt = runtime
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            })
            .expect("SIGINT handler");
        std::thread::spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                eprintln!("interrupted: removing this run's Docker chains");
                if let Ok(docker) = Docker::connect_with_local_defaults() {
                    let owner = format!("{OWNER_LABEL}={}", std::process::id());
                    remove_labelled(&docker, &owner, |_| true).await;
                }
            });
            std::process::exit(130);
        });
    });
}

/// Removes the containers, networks (with their DOCKER-USER allowance) and volumes that carry
/// `label` (`key` or `key=value`) and whose owner pid `doomed` accepts. Best effort: it runs
/// in teardown, where a failure must not hide the test's own.
async fn remove_labelled(docker: &Docker, label: &str, doomed: impl Fn(Option<u32>) -> bool) {
    let owner = |labels: Option<&HashMap<String, String>>| {
        labels
            .and_then(|l| l.get(OWNER_LABEL))
            .and_then(|pid| pid.parse::<u32>().ok())
    };
    let filters = HashMap::from([("label", vec![label])]);
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap_or_default();
    for container in containers {
        if let (Some(id), true) = (&container.id, doomed(owner(container.labels.as_ref()))) {
            remove_container(docker, id).await;
        }
    }
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap_or_default();
    for network in networks {
        let labels: Option<HashMap<String, String>> =
            network.labels.map(|l| l.into_iter().collect());
        let (Some(id), true) = (network.id, doomed(owner(labels.as_ref()))) else {
            continue;
        };
        if let Some(bridge) = network
            .options
            .as_ref()
            .and_then(|o| o.get(BRIDGE_NAME_OPTION))
        {
            allow_routing_within(bridge, false);
        }
        let _ = docker.remove_network(&id).await;
    }
    let volumes = docker
        .list_volumes(Some(
            ListVolumesOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .ok()
        .and_then(|v| v.volumes)
        .unwrap_or_default();
    for volume in volumes {
        if doomed(owner(Some(&volume.labels))) {
            let _ = docker
                .remove_volume(
                    &volume.name,
                    Some(RemoveVolumeOptionsBuilder::default().force(true).build()),
                )
                .await;
        }
    }
}

async fn remove_container(docker: &Docker, id: &str) {
    let _ = docker
        .remove_container(
            id,
            Some(
                RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
        .await;
}

/// Docker isolates an internal network: a bridged packet whose source or destination lies
/// outside the subnet is dropped, which is every packet an SI routes between VNs. Accepting
/// traffic that enters and leaves the same bridge (DOCKER-USER runs first) plays the part of
/// the network policy that lets a service chain through.
fn allow_routing_within(bridge: &str, allow: bool) {
    let rule = ["DOCKER-USER", "-i", bridge, "-o", bridge, "-j", "ACCEPT"];
    let mut command = std::process::Command::new("iptables");
    command.arg(if allow { "-I" } else { "-D" }).args(rule);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("iptables: {e} (apt-get install iptables)"));
    if allow {
        assert!(
            output.status.success(),
            "iptables {rule:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Default for DockerChain {
    fn default() -> Self {
        DockerChain::new()
    }
}

impl Drop for DockerChain {
    fn drop(&mut self) {
        let chain_label = format!("{CHAIN_LABEL}={}", self.prefix);
        self.block_on(remove_labelled(&self.docker, &chain_label, |_| true));
    }
}

//! The `run` loop shared by the VNFs: watch the namespace, assign sides, keep routing and
//! sysctls converged on every link or address change, tear down on shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::dhcp::client::Lease;
use crate::dhcp::driver::{lease_gateway, DhcpInterface, DhcpTask};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::lease::LearnedRoute;
use crate::reported::Reported;
use crate::route_guard::{screening_file, Refusal, RouteGuard, SideScreening};
use crate::routing::{desired_state, Reconciler, RoutingConfig, RoutingMode, MAIN_TABLE};
use crate::side::{assign, side_position, Assignment, Interface, Layout, Side, SideSelectors};
use crate::sysctl::Sysctls;

/// How long a transient kernel error waits before the next attempt.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How often the loop checks whether what it waits for changed (logged only when it did).
const WAITING_LOG_EVERY: Duration = Duration::from_secs(5);
/// Re-converge now and then even without events, so a route someone deleted comes back.
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// What happens to our routes and rules when the process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Remove every route and rule we installed (sysctls stay as set).
    Remove,
    /// Leave routing in place, e.g. to keep forwarding while the process is upgraded.
    Keep,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub selectors: SideSelectors,
    pub routing: RoutingConfig,
    /// None waits forever.
    pub side_timeout: Option<Duration>,
    pub on_exit: OnExit,
    pub dhcp: DhcpConfig,
    /// The VNF's state directory: DHCP leases, so a restart asks for the same one
    /// (INIT-REBOOT), and the sides' MACs (`side_memory`).
    pub state_dir: PathBuf,
}

/// Which sides learn their address, routes and gateway by DHCP.
#[derive(Debug, Clone, Default)]
pub struct DhcpConfig {
    pub sides: Vec<Side>,
    pub hook: Option<PathBuf>,
    /// Leases whose subnet is shorter than this prefix are refused.
    pub min_prefix: u8,
}

/// Told about side changes before routing follows them, so that a firewall is in place
/// before traffic is forwarded; and told at shutdown.
pub trait SidesObserver {
    fn sides_changed(&mut self, assignment: &Assignment) -> Result<()>;
    fn shutdown(&mut self, on_exit: OnExit) -> Result<()>;
    /// The routes the left side's DHCP lease installed now (empty without a lease; refused
    /// ones left out): Dockvpn pushes them to its clients.
    fn left_routes_learned(&mut self, _routes: &[LearnedRoute]) {}
    /// Whether every `--dhcp` side holds a lease now; told at the first convergence (true
    /// at once without DHCP sides) and on every change. Dockvpn serves only once it is true.
    fn dhcp_sides_bound(&mut self, _bound: bool) {}
}

/// For VNFs with nothing to do on side changes.
pub struct NoObserver;

impl SidesObserver for NoObserver {
    fn sides_changed(&mut self, _: &Assignment) -> Result<()> {
        Ok(())
    }

    fn shutdown(&mut self, _: OnExit) -> Result<()> {
        Ok(())
    }
}

struct Runtime<'o> {
    observer: &'o mut dyn SidesObserver,
    dhcp_tasks: Vec<DhcpTask>,
    /// Notified by the DHCP tasks after each lease change.
    dhcp_changed: Arc<Notify>,
    /// Whether the observer has seen the current assignment.
    observed: bool,
    /// The left lease's routes as last told to the observer.
    observed_left_routes: Option<Vec<LearnedRoute>>,
    /// Whether all DHCP sides were bound, as last told to the observer.
    observed_dhcp_bound: Option<bool>,
    /// Per side (in `Side::ALL` order), what its lease's routes must not capture.
    guards: [watch::Sender<RouteGuard>; 3],
    /// The DHCP sides' learned routes as last logged and written for `status`.
    screening: Vec<SideScreening>,
    config: RuntimeConfig,
    kernel: Kernel,
    reconciler: Reconciler,
    sysctls: Sysctls,
    started: Instant,
    interfaces: Vec<Interface>,
    assignment: Assignment,
    ready: bool,
    /// Conditions re-checked on every convergence, logged once each and again on change.
    reported: ReportedConditions,
}

#[derive(Default)]
struct ReportedConditions {
    waiting: Reported<String>,
    retrying: Reported<Option<String>>,
    gateways_outside: Reported<Vec<(Side, std::net::Ipv4Addr)>>,
    no_mac: Reported<Vec<Side>>,
    redundant_left_routes: Reported<Vec<ipnet::Ipv4Net>>,
}

/// Runs until `shutdown` completes (Ok) or a side never appears or the config is wrong (Err).
/// `started` is when the process started, for the "forwarding ready" latency.
pub async fn run(
    config: RuntimeConfig,
    started: Instant,
    shutdown: impl Future<Output = ()>,
    observer: &mut dyn SidesObserver,
) -> Result<()> {
    config.selectors.validate()?;
    config.routing.validate()?;
    require_net_admin()?;
    // Subscribe before the first dump so no change slips between them.
    let mut events = Kernel::watch()?;
    let kernel = Kernel::connect()?;
    let mut runtime = Runtime {
        observer,
        dhcp_tasks: Vec::new(),
        dhcp_changed: Arc::new(Notify::new()),
        observed: false,
        observed_left_routes: None,
        observed_dhcp_bound: None,
        guards: Side::ALL.map(|_| watch::channel(RouteGuard::default()).0),
        screening: Vec::new(),
        reconciler: Reconciler::new(kernel.clone()),
        kernel,
        sysctls: Sysctls::default(),
        started,
        interfaces: Vec::new(),
        assignment: Assignment::default(),
        ready: false,
        reported: ReportedConditions::default(),
        config,
    };
    info!(
        mode = ?runtime.config.routing.mode,
        left = %runtime.config.selectors.describe(Side::Left),
        right = %runtime.config.selectors.describe(Side::Right),
        "starting"
    );
    // A file a killed run left would list its leases' routes until this run has its own.
    runtime.forget_screening();

    tokio::pin!(shutdown);
    let dhcp_changed = runtime.dhcp_changed.clone();
    let mut waiting_log = tokio::time::interval(WAITING_LOG_EVERY);
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.reset();
    let give_up_at = runtime
        .config
        .side_timeout
        .map(|timeout| tokio::time::Instant::from_std(started + timeout));
    let outcome = loop {
        let pass_started = Instant::now();
        let converged = runtime.converge().await;
        runtime.count_pass(pass_started.elapsed(), converged.is_ok());
        let retry_at = match converged {
            Ok(()) => {
                runtime.reported.retrying.changed(None);
                None
            }
            Err(error) if error.is_transient() => {
                if runtime.reported.retrying.changed(Some(error.to_string())) {
                    warn!(%error, "routing not converged; retrying every 0.5 s");
                }
                Some(tokio::time::Instant::now() + RETRY_AFTER)
            }
            Err(error) => break Err(error),
        };
        tokio::select! {
            () = dhcp_changed.notified() => {}
            () = &mut shutdown => {
                info!("shutdown requested");
                break Ok(());
            }
            event = events.next() => {
                if event.is_none() {
                    break Err(Error::Netlink {
                        operation: "watch link and address events".into(),
                        source: std::io::Error::other("event socket closed"),
                    });
                }
                // A hot-plug comes as a burst of link and address events: converge once.
                while events.try_recv().is_ok() {}
            }
            _ = waiting_log.tick() => runtime.log_waiting(),
            () = sleep_until(give_up_at.filter(|_| !runtime.ready)) => break Err(runtime.timeout_error()),
            _ = resync.tick() => {}
            () = sleep_until(retry_at) => {}
        }
    };

    if let Err(error) = &outcome {
        error!(%error, "stopping");
    }
    let release = runtime.config.on_exit == OnExit::Remove;
    for task in runtime.dhcp_tasks.drain(..) {
        task.stop(release).await;
    }
    if let Err(error) = runtime.observer.shutdown(runtime.config.on_exit) {
        error!(%error, "shutdown incomplete");
    }
    match runtime.config.on_exit {
        OnExit::Remove => {
            runtime.forget_screening();
            match runtime.reconciler.teardown().await {
                Ok(changes) if !changes.is_empty() => info!(%changes, "routing removed"),
                Ok(_) => {}
                Err(error) => error!(%error, "could not remove routing state"),
            }
        }
        OnExit::Keep => info!("routing state left in place (--on-exit keep)"),
    }
    outcome
}

/// The routing config with each DHCP side's gateway taken from its lease, unless one was
/// given explicitly. A lease gateway outside the side's subnet is not used (see
/// `lease_gateways_outside`).
pub fn with_lease_gateways(
    routing: &RoutingConfig,
    assignment: &Assignment,
    leases: impl Iterator<Item = (Side, Lease)>,
) -> RoutingConfig {
    let mut routing = routing.clone();
    for (side, lease) in leases {
        let (Some(gateway), Some(ready)) = (lease_gateway(&lease), assignment.ready(side)) else {
            continue;
        };
        if !ready.subnet().contains(&gateway) {
            continue;
        }
        match side {
            Side::Left if routing.left_gateway.is_none() => routing.left_gateway = Some(gateway),
            Side::Right if routing.right_gateway.is_none() => routing.right_gateway = Some(gateway),
            _ => {}
        }
    }
    routing
}

/// The lease gateways `with_lease_gateways` leaves out, being outside their side's subnet.
fn lease_gateways_outside(
    assignment: &Assignment,
    leases: impl Iterator<Item = (Side, Lease)>,
) -> Vec<(Side, std::net::Ipv4Addr)> {
    leases
        .filter_map(|(side, lease)| {
            let gateway = lease_gateway(&lease)?;
            let outside = !assignment.ready(side)?.subnet().contains(&gateway);
            outside.then_some((side, gateway))
        })
        .collect()
}

/// Routes, rules, addresses and nftables all need CAP_NET_ADMIN; without it every change
/// fails with EPERM, which looks transient. Say so once and stop.
pub fn require_net_admin() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| Error::Io {
        context: "read /proc/self/status".into(),
        source,
    })?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(u64::MAX);
    if effective & (1 << CAP_NET_ADMIN) == 0 {
        return Err(Error::Vnf(
            "missing the NET_ADMIN capability, needed to configure routes, rules and nftables: start the container with --cap-add NET_ADMIN (compose: cap_add: [NET_ADMIN])".into(),
        ));
    }
    Ok(())
}

/// Sleeps until `deadline`, or forever without one: a `select!` arm for an optional timer.
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Runtime<'_> {
    async fn converge(&mut self) -> Result<()> {
        let interfaces = self.kernel.interfaces().await?;
        let assignment = assign(&self.config.selectors, &interfaces)?;
        self.log_side_changes(&assignment);
        self.remember_sides(&assignment);
        if assignment.ready != self.assignment.ready {
            self.observed = false;
        }
        self.assignment = assignment;
        self.interfaces = interfaces;
        if !self.observed {
            self.observer.sides_changed(&self.assignment)?;
            self.observed = true;
        }
        self.ensure_dhcp_clients();
        let routing = self.routing_with_lease_gateways();
        self.update_guards(&routing);
        self.screen_learned_routes();
        self.tell_dhcp_bound();

        let mut routed: Vec<&str> = [Side::Left, Side::Right]
            .iter()
            .filter_map(|&side| self.assignment.ready(side).map(|r| r.name.as_str()))
            .collect();
        let ready = routed.len() == 2;
        // One-armed, both sides are one interface.
        routed.dedup();
        if !routed.is_empty() {
            self.sysctls.ensure_forwarding(&routed)?;
        }
        self.report_routing_conditions(&routing);
        let desired = desired_state(&routing, &self.assignment)?;
        let changes = self.reconciler.apply(&desired).await?;
        if !changes.is_empty() {
            info!(%changes, "routing converged");
        }

        if ready && !self.ready {
            info!(
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "forwarding ready"
            );
        } else if !ready && self.ready {
            warn!("a side went away; forwarding paused until it is back");
        }
        self.ready = ready;
        Ok(())
    }

    /// Starts a DHCP client on every DHCP side whose interface is known (an address is not
    /// needed: the client brings it), and replaces one whose interface changed. One-armed,
    /// the leg has one client, the first side's.
    fn ensure_dhcp_clients(&mut self) {
        let mut no_mac = Vec::new();
        for &side in &self.config.dhcp.sides {
            let Some(interface) = self.assignment.interface(side) else {
                continue;
            };
            if self
                .dhcp_tasks
                .iter()
                .any(|t| t.side == side && t.index == interface.index)
            {
                continue;
            }
            self.dhcp_tasks.retain(|t| t.side != side);
            if self.dhcp_tasks.iter().any(|t| t.index == interface.index) {
                continue;
            }
            let Some(mac) = interface.mac else {
                no_mac.push(side);
                continue;
            };
            let table = match self.config.routing.mode {
                RoutingMode::Cross => self.config.routing.table(side),
                RoutingMode::Global => MAIN_TABLE,
            };
            info!(%side, interface = %interface.name, table, "starting the DHCP client");
            self.dhcp_tasks.push(DhcpTask::spawn(
                DhcpInterface {
                    side,
                    index: interface.index,
                    name: interface.name.clone(),
                    mac,
                    mtu: interface.mtu,
                    table,
                    state_dir: self.config.state_dir.clone(),
                    hook: self.config.dhcp.hook.clone(),
                    min_prefix: self.config.dhcp.min_prefix,
                    guard: self.guard(side).subscribe(),
                },
                self.dhcp_changed.clone(),
            ));
        }
        if self.reported.no_mac.changed(no_mac.clone()) && !no_mac.is_empty() {
            let sides: Vec<&str> = no_mac.iter().map(|side| side.as_str()).collect();
            warn!(sides = %sides.join(", "), "no MAC address: DHCP cannot run on these sides");
        }
    }

    /// Warns, once per change, about configuration the routing leaves out.
    fn report_routing_conditions(&mut self, routing: &RoutingConfig) {
        let leases = self
            .dhcp_tasks
            .iter()
            .filter_map(|t| Some((t.side, t.lease()?)));
        let outside = lease_gateways_outside(&self.assignment, leases);
        if self.reported.gateways_outside.changed(outside.clone()) {
            for (side, gateway) in outside {
                warn!(%side, %gateway, "the lease's gateway is outside the side's subnet; not used for the side's default route");
            }
        }
        let redundant = routing.left_routes_already_connected(&self.assignment);
        if self
            .reported
            .redundant_left_routes
            .changed(redundant.clone())
        {
            for network in redundant {
                warn!(%network, "left route equals a connected subnet; the kernel already routes it");
            }
        }
    }

    fn guard(&self, side: Side) -> &watch::Sender<RouteGuard> {
        &self.guards[side_position(side)]
    }

    /// In global mode the left lease's routes go into `main`: keep them from capturing the
    /// right side, the management side and the VPN pool as those sides come and go.
    fn update_guards(&self, routing: &RoutingConfig) {
        for side in Side::ALL {
            let guard = match (self.config.routing.mode, side) {
                (RoutingMode::Global, Side::Left) => {
                    RouteGuard::for_global_left(routing, &self.assignment)
                }
                _ => RouteGuard::default(),
            };
            self.guard(side).send_if_modified(|current| {
                let changed = *current != guard;
                *current = guard;
                changed
            });
        }
    }

    /// Splits every lease's routes the way its DHCP task installs them; names each newly
    /// refused route in one warning, writes the split for `status` and tells the observer
    /// the left routes installed.
    fn screen_learned_routes(&mut self) {
        let screening: Vec<SideScreening> = self
            .dhcp_tasks
            .iter()
            .filter_map(|task| {
                let lease = task.lease()?;
                Some(SideScreening {
                    side: task.side,
                    screened: self.guard(task.side).borrow().screen(&lease.routes),
                })
            })
            .collect();
        let left_routes: Vec<LearnedRoute> = screening
            .iter()
            .filter(|s| s.side == Side::Left)
            .flat_map(|s| s.screened.installed.iter().copied())
            .collect();
        if self.observed_left_routes.as_ref() != Some(&left_routes) {
            self.observer.left_routes_learned(&left_routes);
            self.observed_left_routes = Some(left_routes);
        }
        if screening == self.screening {
            return;
        }
        for now in &screening {
            let before = self.screening.iter().find(|s| s.side == now.side);
            for refused in &now.screened.refused {
                if before.is_some_and(|b| b.screened.refused.contains(refused)) {
                    continue;
                }
                let (side, route, reason) = (now.side, refused.route.destination, refused.reason);
                match reason {
                    Refusal::DefaultRoute => {
                        info!(%side, %route, %reason, "learned route not installed")
                    }
                    _ => warn!(%side, %route, %reason, "learned route refused"),
                }
            }
        }
        let path = screening_file(&self.config.state_dir);
        if let Err(error) = crate::fs::write_json(&path, &screening, false) {
            warn!(file = %path.display(), %error, "could not write the learned routes for status");
        }
        self.screening = screening;
    }

    /// The leases were released: `status` must not list their routes.
    fn forget_screening(&self) {
        let _ = std::fs::remove_file(screening_file(&self.config.state_dir));
    }

    fn tell_dhcp_bound(&mut self) {
        // One-armed, one client on the leg serves both sides: match by interface, not side.
        let bound = self.config.dhcp.sides.iter().all(|&side| {
            self.assignment.interface(side).is_some_and(|interface| {
                self.dhcp_tasks
                    .iter()
                    .any(|t| t.index == interface.index && t.lease().is_some())
            })
        });
        if self.observed_dhcp_bound != Some(bound) {
            self.observer.dhcp_sides_bound(bound);
            self.observed_dhcp_bound = Some(bound);
        }
    }

    fn routing_with_lease_gateways(&self) -> RoutingConfig {
        let leases = self
            .dhcp_tasks
            .iter()
            .filter_map(|t| Some((t.side, t.lease()?)));
        with_lease_gateways(&self.config.routing, &self.assignment, leases)
    }

    /// Stores the MAC of each side's interface that was chosen by order (not by a selector),
    /// so a restart that enumerates the interfaces differently keeps the sides.
    fn remember_sides(&mut self, assignment: &Assignment) {
        let selectors = &self.config.selectors;
        let mut remembered = selectors.remembered;
        for side in Side::ALL {
            // One-armed, the right side borrows the left's leg: nothing to remember for it.
            let borrowed = side == Side::Right && assignment.is_one_armed();
            if selectors.get(side).is_none() && !borrowed {
                if let Some(mac) = assignment.interface(side).and_then(|i| i.mac) {
                    remembered.set(side, mac);
                }
            }
        }
        if remembered == selectors.remembered {
            return;
        }
        if let Err(error) = remembered.store(&self.config.state_dir) {
            warn!(dir = %self.config.state_dir.display(), %error, "could not store the sides' MACs; a restart goes by order of appearance");
        }
        self.config.selectors.remembered = remembered;
    }

    fn log_side_changes(&self, next: &Assignment) {
        if next.layout != self.assignment.layout {
            match (
                next.layout,
                next.interface(Side::Left),
                next.interface(Side::Right),
            ) {
                (Layout::OneArmed, Some(leg), _) => info!(
                    interface = %leg.name,
                    "running one-armed: the only leg serves as left and right side (listeners, client traffic, masquerade); a second leg plugged in later switches to dual-homed"
                ),
                (Layout::DualHomed, _, Some(right)) => info!(
                    right = %right.name,
                    "a second leg is here: running dual-homed"
                ),
                _ => {}
            }
        }
        for side in Side::ALL {
            let before = self.assignment.ready(side);
            let after = next.ready(side);
            if before == after {
                continue;
            }
            crate::metrics::core().side_changed();
            match after {
                Some(ready) => {
                    info!(%side, interface = %ready.name, address = %ready.address, "side ready")
                }
                None => {
                    let reason = next.waiting_reason(side, &self.config.selectors);
                    info!(%side, %reason, "side not ready");
                }
            }
        }
    }

    /// Routing is converged when a pass succeeded with both sides ready.
    fn count_pass(&self, took: Duration, succeeded: bool) {
        let ready =
            [Side::Left, Side::Right].map(|side| (side, self.assignment.ready(side).is_some()));
        crate::metrics::core().reconciled(took, ready, succeeded && self.ready);
    }

    fn missing_sides(&self) -> Vec<Side> {
        [Side::Left, Side::Right]
            .into_iter()
            .filter(|&side| self.assignment.ready(side).is_none())
            .collect()
    }

    fn waiting_detail(&self) -> String {
        self.missing_sides()
            .iter()
            .map(|&side| {
                format!(
                    "{side}: {}",
                    self.assignment.waiting_reason(side, &self.config.selectors)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Says what it waits for, once per change of what is missing.
    fn log_waiting(&mut self) {
        if self.ready {
            self.reported.waiting.changed(String::new());
        } else if self.started.elapsed() >= WAITING_LOG_EVERY / 2 {
            let (detail, present) = (self.waiting_detail(), self.present_interfaces());
            if self.reported.waiting.changed(format!("{detail} {present}")) {
                info!(%detail, %present, "waiting for sides");
            }
        }
    }

    fn timeout_error(&self) -> Error {
        Error::SideTimeout {
            missing: self
                .missing_sides()
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" and "),
            waited_secs: self.started.elapsed().as_secs(),
            detail: self.waiting_detail(),
            present: self.present_interfaces(),
        }
    }

    fn present_interfaces(&self) -> String {
        let names: Vec<String> = self
            .interfaces
            .iter()
            .filter(|i| i.name != "lo")
            .map(|i| {
                let side = Side::ALL.into_iter().find(|&side| {
                    self.assignment
                        .interface(side)
                        .is_some_and(|a| a.index == i.index)
                });
                match side {
                    Some(side) => format!("{} ({side})", i.name),
                    None => i.name.clone(),
                }
            })
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

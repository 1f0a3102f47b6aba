//! The thin tokio driver around the sans-IO client: one task per DHCP side moves packets
//! between the client and the sockets, applies lease events to the kernel through
//! `crate::lease`, stores the lease (a restart does INIT-REBOOT), publishes it on a watch
//! channel (the live route feed Dockvpn pushes from) and runs the optional user hook.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::client::{
    Client, ClientConfig, Destination, Event, Lease, Progress, Setback, State, Transmit,
};
use super::client_status::{client_status_file, format_wait, DhcpClientStatus, LastError};
use super::socket::{unicast_socket, PacketSocket, SERVER_PORT};
use crate::clock::{unix_now, WallClock};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::lease::{BoundLease, LeaseApplier, LeaseTarget};
use crate::route_guard::RouteGuard;
use crate::runtime::sleep_until;
use crate::side::Side;

const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// A renewal that changes nothing runs the hook at most this often.
const HOOK_UNCHANGED_EVERY: Duration = Duration::from_secs(60);

/// One interface to run DHCP on.
#[derive(Debug, Clone)]
pub struct DhcpInterface {
    pub side: Side,
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    /// Option 57 (maximum message size) is at least this.
    pub mtu: u32,
    /// The table lease routes go into (the side table in cross mode, main in global mode).
    pub table: u32,
    pub state_dir: PathBuf,
    /// A command run with every lease change (env + JSON on stdin), dhclient-script style.
    pub hook: Option<PathBuf>,
    /// Leases whose subnet is shorter than this prefix are refused.
    pub min_prefix: u8,
    /// Which learned routes stay out of the kernel; the lease's routes follow its changes.
    pub guard: watch::Receiver<RouteGuard>,
}

impl DhcpInterface {
    fn lease_file(&self) -> PathBuf {
        lease_file(&self.state_dir, &self.name)
    }
}

pub fn lease_file(state_dir: &Path, interface: &str) -> PathBuf {
    state_dir.join(format!("dhcp-{interface}.json"))
}

/// A lease as stored in the state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredLease {
    pub lease: Lease,
    pub acquired_unix: u64,
}

impl StoredLease {
    pub fn expires_unix(&self) -> u64 {
        self.acquired_unix + u64::from(self.lease.lease_secs)
    }
}

pub fn read_stored(path: &Path) -> Option<StoredLease> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str::<StoredLease>(&text) {
        Ok(stored) => Some(stored),
        Err(error) => {
            warn!(file = %path.display(), %error, "ignoring an unreadable stored lease");
            None
        }
    }
}

/// A running DHCP client task.
pub struct DhcpTask {
    pub side: Side,
    pub index: u32,
    feed: watch::Receiver<Option<Lease>>,
    stop: Option<oneshot::Sender<bool>>,
    handle: JoinHandle<()>,
}

impl DhcpTask {
    /// Starts the client; `changed` is notified after every lease change has been applied.
    pub fn spawn(interface: DhcpInterface, changed: Arc<Notify>) -> DhcpTask {
        let (feed_sender, feed) = watch::channel(None);
        let (stop, stop_receiver) = oneshot::channel();
        let (side, index, name) = (interface.side, interface.index, interface.name.clone());
        let status_file = client_status_file(&interface.state_dir, &name);
        let handle = tokio::spawn(async move {
            let outcome = drive(
                interface,
                status_file.clone(),
                feed_sender,
                changed.clone(),
                stop_receiver,
            )
            .await;
            if let Err(error) = outcome {
                warn!(%side, interface = %name, %error, "DHCP client stopped");
                publish_failure(&status_file, side, &name, &error);
                changed.notify_one();
            }
        });
        DhcpTask {
            side,
            index,
            feed,
            stop: Some(stop),
            handle,
        }
    }

    /// The live route feed: the current lease, None while there is none.
    pub fn feed(&self) -> watch::Receiver<Option<Lease>> {
        self.feed.clone()
    }

    pub fn lease(&self) -> Option<Lease> {
        self.feed.borrow().clone()
    }

    /// Stops the client; with `release` it sends DHCPRELEASE and removes the lease from the
    /// kernel, otherwise address and routes stay for the next start's INIT-REBOOT.
    pub async fn stop(mut self, release: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(release);
        }
        let _ = (&mut self.handle).await;
    }
}

impl Drop for DhcpTask {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.handle.abort();
        }
    }
}

struct Driver {
    interface: DhcpInterface,
    raw: PacketSocket,
    unicast: Option<UdpSocket>,
    applier: LeaseApplier,
    feed: watch::Sender<Option<Lease>>,
    changed: Arc<Notify>,
    progress: ProgressPublisher,
    /// The lease the hook last ran with, and when.
    hook_ran: Option<(Option<Lease>, Instant)>,
}

/// Publishes the client's progress for `status` and logs each new setback once.
struct ProgressPublisher {
    file: PathBuf,
    clock: WallClock,
    /// The progress last written: the file is rebuilt only when it changes.
    published: Option<Progress>,
    logged_setback: Option<Setback>,
}

async fn drive(
    interface: DhcpInterface,
    status_file: PathBuf,
    feed: watch::Sender<Option<Lease>>,
    changed: Arc<Notify>,
    mut stop: oneshot::Receiver<bool>,
) -> Result<()> {
    let name = interface.name.clone();
    let io_error = |context: &str| {
        let context = format!("{context} on {name}");
        move |source| Error::Io { context, source }
    };
    let raw = PacketSocket::open(interface.index)
        .map_err(io_error("open the DHCP packet socket (needs NET_RAW)"))?;
    let target = LeaseTarget {
        interface: interface.index,
        table: interface.table,
        // The side routing owns default routes; the lease supplies their gateway.
        install_default: false,
    };
    let config = ClientConfig {
        mac: interface.mac,
        mtu: u16::try_from(interface.mtu).unwrap_or(u16::MAX),
        hostname: None,
        min_prefix: interface.min_prefix,
    };
    let seed = unix_now() ^ u64::from(interface.index) << 32 ^ u64::from(std::process::id());
    let now = Instant::now();
    let mut client = match read_stored(&interface.lease_file())
        .filter(|s| s.expires_unix() > unix_now())
    {
        Some(stored) => {
            info!(side = %interface.side, address = %stored.lease.address, "asking to keep the stored lease (INIT-REBOOT)");
            Client::with_stored_lease(config, seed, now, stored.lease)
        }
        None => Client::new(config, seed, now),
    };
    let mut driver = Driver {
        applier: LeaseApplier::new(Kernel::connect()?, target),
        interface,
        raw,
        unicast: None,
        feed,
        changed,
        progress: ProgressPublisher {
            file: status_file,
            clock: WallClock::now(),
            published: None,
            logged_setback: None,
        },
        hook_ran: None,
    };
    let mut guard = driver.interface.guard.clone();
    let outcome = async {
        loop {
            driver.flush(&mut client).await;
            driver.publish_progress(&client);
            let deadline = client.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                received = driver.raw.recv() => {
                    let (source, payload) = received.map_err(io_error("receive DHCP"))?;
                    if let Err(reason) = client.handle_packet(Instant::now(), source, &payload) {
                        debug!(%reason, "DHCP packet dropped");
                    }
                }
                Ok(()) = guard.changed() => {
                    if let Some(lease) = client.lease() {
                        driver.reroute(lease).await;
                    }
                }
                () = sleep_until(deadline) => client.handle_timeout(Instant::now()),
                release = &mut stop => {
                    if release.unwrap_or(false) {
                        client.release();
                        driver.flush(&mut client).await;
                    }
                    return Ok(());
                }
            }
        }
    }
    .await;
    // A stopped client publishes nothing; a failed one is published by the task.
    let _ = std::fs::remove_file(&driver.progress.file);
    outcome
}

/// Publishes a client that stopped on an error, so `status` says why.
fn publish_failure(file: &Path, side: Side, interface: &str, error: &Error) {
    let clock = WallClock::now();
    let now = Instant::now();
    let status = DhcpClientStatus {
        pid: std::process::id(),
        side,
        interface: interface.to_owned(),
        state: State::Stopped,
        since_unix: clock.unix(now),
        offers_seen: 0,
        last_error: Some(LastError {
            at_unix: clock.unix(now),
            reason: error.to_string(),
        }),
        lease: None,
    };
    if let Err(error) = crate::fs::write_json(file, &status, false) {
        warn!(file = %file.display(), %error, "could not publish the DHCP client's status");
    }
}

impl Driver {
    /// Sends what the client queued and acts on its events.
    async fn flush(&mut self, client: &mut Client) {
        while let Some(transmit) = client.poll_transmit() {
            if let Err(error) = self.send(&transmit) {
                warn!(interface = %self.interface.name, %error, "could not send a DHCP packet");
            }
        }
        while let Some(event) = client.poll_event() {
            self.handle(event).await;
        }
    }

    fn send(&self, transmit: &Transmit) -> std::io::Result<()> {
        match (transmit.destination, &self.unicast) {
            (Destination::Server(server), Some(socket)) => socket
                .send_to(&transmit.payload, SocketAddrV4::new(server, SERVER_PORT))
                .map(drop),
            // No usable address yet: a broadcast reaches the server too.
            _ => self.raw.send_broadcast(&transmit.payload),
        }
    }

    /// The routes of `lease` the guard lets into the kernel.
    fn installable(&self, lease: &Lease) -> Vec<crate::lease::LearnedRoute> {
        self.interface
            .guard
            .borrow()
            .screen(&lease.routes)
            .installed
    }

    /// The guard changed: the installed lease keeps its address, its routes follow.
    async fn reroute(&mut self, lease: &Lease) {
        let routes = self.installable(lease);
        match self.applier.replace_routes(&routes).await {
            Ok(changes) if !changes.is_empty() => {
                info!(side = %self.interface.side, %changes, "DHCP routes follow the sides")
            }
            Ok(_) => {}
            Err(error) => {
                warn!(side = %self.interface.side, %error, "DHCP routes not fully applied")
            }
        }
    }

    async fn handle(&mut self, event: Event) {
        let side = self.interface.side;
        match event {
            Event::Renewed { .. } => crate::metrics::core().dhcp_renewed(side),
            Event::Expired(_) => crate::metrics::core().dhcp_expired(side),
            Event::Nak => crate::metrics::core().dhcp_nak(side),
            _ => {}
        }
        match event {
            Event::Bound(lease) | Event::Renewed { lease, .. } => {
                let bound = BoundLease {
                    address: lease.address,
                    valid_secs: lease.lease_secs,
                    routes: self.installable(&lease),
                };
                match self.applier.apply(&bound).await {
                    Ok(changes) => {
                        info!(%side, address = %lease.address, routes = bound.routes.len(), source = %lease.route_source, %changes, "DHCP lease applied")
                    }
                    Err(error) => warn!(%side, %error, "DHCP lease not fully applied"),
                }
                self.unicast = unicast_socket(lease.address.addr(), &self.interface.name)
                    .map_err(
                        |error| debug!(%error, "no unicast DHCP socket; renewals go by broadcast"),
                    )
                    .ok();
                let stored = StoredLease {
                    lease: lease.clone(),
                    acquired_unix: unix_now(),
                };
                if let Err(error) = store(&self.interface.lease_file(), &stored) {
                    warn!(%error, "could not store the DHCP lease");
                }
                self.publish("bound", Some(lease)).await;
            }
            Event::Expired(_) | Event::Nak | Event::Released(_) => {
                let reason = match event {
                    Event::Expired(_) => "expired",
                    Event::Nak => "nak",
                    _ => "released",
                };
                info!(%side, %reason, "DHCP lease gone; removing its address and routes");
                if let Err(error) = self.applier.remove().await {
                    warn!(%side, %error, "could not remove the DHCP lease");
                }
                self.unicast = None;
                let _ = std::fs::remove_file(self.interface.lease_file());
                self.publish(reason, None).await;
            }
            Event::RoutesRejected(reasons) => {
                for reason in reasons {
                    warn!(%side, %reason, "DHCP route option rejected");
                }
            }
            Event::NoOffer { waited } => warn!(
                "no DHCPOFFER on {side} after {} (still trying; is a DHCP server on this network?)",
                format_wait(waited)
            ),
        }
    }

    /// Rewrites the client's status file when its progress changed.
    fn publish_progress(&mut self, client: &Client) {
        let progress = client.progress();
        crate::metrics::core().dhcp_state(self.interface.side, progress.state);
        let (side, interface) = (self.interface.side, &self.interface.name);
        if let Some((_, setback)) = progress.last_setback {
            if self.progress.logged_setback != Some(setback) {
                warn!(%side, %interface, "{setback}");
                self.progress.logged_setback = Some(setback);
            }
        }
        if self.progress.published.as_ref() == Some(&progress) {
            return;
        }
        let status = DhcpClientStatus::new(side, interface, &progress, &self.progress.clock);
        match crate::fs::write_json(&self.progress.file, &status, false) {
            Ok(()) => self.progress.published = Some(progress),
            Err(error) => {
                warn!(file = %self.progress.file.display(), %error, "could not publish the DHCP client's status")
            }
        }
    }

    async fn publish(&mut self, reason: &str, lease: Option<Lease>) {
        if let Some(hook) = &self.interface.hook {
            // A server renewing in a loop must not run the hook in a loop.
            let unchanged_recently = self.hook_ran.as_ref().is_some_and(|(last, at)| {
                same_but_times(last.as_ref(), lease.as_ref()) && at.elapsed() < HOOK_UNCHANGED_EVERY
            });
            if unchanged_recently {
                debug!(interface = %self.interface.name, "lease unchanged; DHCP hook not run again so soon");
            } else {
                run_hook(hook, reason, &self.interface.name, lease.as_ref()).await;
                self.hook_ran = Some((lease.clone(), Instant::now()));
            }
        }
        self.feed.send_replace(lease);
        self.changed.notify_one();
    }
}

/// Two leases that differ at most in their timers (a plain renewal).
fn same_but_times(a: Option<&Lease>, b: Option<&Lease>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            (a.address, a.server, &a.routers, &a.dns, &a.routes)
                == (b.address, b.server, &b.routers, &b.dns, &b.routes)
        }
        (None, None) => true,
        _ => false,
    }
}

fn store(path: &Path, stored: &StoredLease) -> std::io::Result<()> {
    crate::fs::write_json(path, stored, true)
}

/// Writes `value` as JSON, creating the state directory; `durable` survives a power cut.
/// Runs the hook with the lease in the environment and as JSON on stdin, bounded in time.
async fn run_hook(hook: &Path, reason: &str, interface: &str, lease: Option<&Lease>) {
    let routes = lease
        .map(|l| {
            l.routes
                .iter()
                .map(|r| match r.gateway {
                    Some(gateway) => format!("{},{gateway}", r.destination),
                    None => r.destination.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let mut command = tokio::process::Command::new(hook);
    command
        .env("VNF_DHCP_REASON", reason)
        .env("VNF_DHCP_INTERFACE", interface)
        .env(
            "VNF_DHCP_ADDRESS",
            lease.map(|l| l.address.to_string()).unwrap_or_default(),
        )
        .env("VNF_DHCP_ROUTES", routes)
        .stdin(Stdio::piped())
        .kill_on_drop(true);
    let run = async {
        let mut child = command.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&serde_json::to_vec(&lease).unwrap_or_default())
                .await?;
        }
        child.wait().await
    };
    match tokio::time::timeout(HOOK_TIMEOUT, run).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => warn!(hook = %hook.display(), %status, "DHCP hook failed"),
        Ok(Err(error)) => warn!(hook = %hook.display(), %error, "DHCP hook could not run"),
        Err(_) => warn!(hook = %hook.display(), "DHCP hook timed out and was killed"),
    }
}

/// The gateway a lease offers for its side: the default route's router, else option 3.
pub fn lease_gateway(lease: &Lease) -> Option<Ipv4Addr> {
    lease
        .routes
        .iter()
        .find(|r| r.destination.prefix_len() == 0)
        .and_then(|r| r.gateway)
        .or_else(|| lease.routers.first().copied())
}

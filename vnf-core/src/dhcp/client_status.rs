//! What a running DHCP client is doing, published for `status` (a separate process): the
//! driver rewrites `dhcp-IFACE.client.json` in the state directory on every change of the
//! client's progress, and removes it when the client stops.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::client::{Progress, State};
use crate::clock::{unix_now, WallClock};
use crate::side::Side;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpClientStatus {
    /// The `run` process the client runs in: a file whose process is gone is stale.
    pub pid: u32,
    pub side: Side,
    pub interface: String,
    pub state: State,
    /// When the client entered `state`.
    pub since_unix: u64,
    /// DHCPOFFERs taken up since the client last bound (or started).
    pub offers_seen: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    /// The lease held now (bound, renewing or rebinding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseTimes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub at_unix: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTimes {
    pub address: Ipv4Net,
    pub renew_at_unix: u64,
    pub rebind_at_unix: u64,
    pub bound_until_unix: u64,
}

pub fn client_status_file(state_dir: &Path, interface: &str) -> PathBuf {
    state_dir.join(format!("dhcp-{interface}.client.json"))
}

/// The status the client on `interface` published, if its process still runs.
pub fn read_running(state_dir: &Path, interface: &str) -> Option<DhcpClientStatus> {
    let text = std::fs::read_to_string(client_status_file(state_dir, interface)).ok()?;
    serde_json::from_str::<DhcpClientStatus>(&text)
        .ok()
        .filter(|status| Path::new(&format!("/proc/{}", status.pid)).exists())
}

impl DhcpClientStatus {
    pub fn new(side: Side, interface: &str, progress: &Progress, clock: &WallClock) -> Self {
        DhcpClientStatus {
            pid: std::process::id(),
            side,
            interface: interface.to_owned(),
            state: progress.state,
            since_unix: clock.unix(progress.since),
            offers_seen: progress.offers_seen,
            last_error: progress.last_setback.map(|(at, setback)| LastError {
                at_unix: clock.unix(at),
                reason: setback.to_string(),
            }),
            lease: progress.lease_deadlines.map(|deadlines| LeaseTimes {
                address: deadlines.address,
                renew_at_unix: clock.unix(deadlines.renew_at),
                rebind_at_unix: clock.unix(deadlines.rebind_at),
                bound_until_unix: clock.unix(deadlines.expires_at),
            }),
        }
    }

    /// The client holds a lease: bound, or renewing or rebinding one still valid (the
    /// client reports lease deadlines only then).
    pub fn is_bound(&self) -> bool {
        self.lease.is_some()
    }

    /// One line for `status`, e.g. "selecting since 12:00:01 UTC (25 s), 0 offers seen".
    pub fn describe(&self) -> String {
        let now = unix_now();
        let mut text = match &self.lease {
            Some(lease) => {
                let mut text = format!(
                    "{} {} until {} ({} s left)",
                    state_name(self.state),
                    lease.address,
                    clock_time(lease.bound_until_unix),
                    lease.bound_until_unix.saturating_sub(now)
                );
                if self.state == State::Bound {
                    let _ = write!(text, ", renewing at {}", clock_time(lease.renew_at_unix));
                }
                text
            }
            _ => format!(
                "{} since {} ({} s), {} offers seen",
                state_name(self.state),
                clock_time(self.since_unix),
                now.saturating_sub(self.since_unix),
                self.offers_seen
            ),
        };
        if let Some(error) = &self.last_error {
            let _ = write!(
                text,
                "; last error {} s ago: {}",
                now.saturating_sub(error.at_unix),
                error.reason
            );
        }
        text
    }
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Init => "starting",
        State::Selecting => "selecting",
        State::Requesting => "requesting",
        State::InitReboot => "asking to keep the stored lease",
        State::Bound => "bound",
        State::Renewing => "renewing",
        State::Rebinding => "rebinding",
        State::Stopped => "stopped",
    }
}

/// "HH:MM:SS UTC" of a unix time.
fn clock_time(unix: u64) -> String {
    let seconds = unix % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// "10 s", "1 min", "2 min 30 s": for log lines about waiting.
pub fn format_wait(wait: Duration) -> String {
    let secs = wait.as_secs();
    match (secs / 60, secs % 60) {
        (0, seconds) => format!("{seconds} s"),
        (minutes, 0) => format!("{minutes} min"),
        (minutes, seconds) => format!("{minutes} min {seconds} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_clock_times_read_as_people_write_them() {
        let formatted: Vec<String> = [10, 30, 60, 150, 600]
            .map(|secs| format_wait(Duration::from_secs(secs)))
            .to_vec();
        assert_eq!(formatted, ["10 s", "30 s", "1 min", "2 min 30 s", "10 min"]);
        assert_eq!(clock_time(86_400 + 3600 * 13 + 60 * 5 + 9), "13:05:09 UTC");
    }
}

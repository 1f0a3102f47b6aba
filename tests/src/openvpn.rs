//! The stock OpenVPN 2.6 client from Debian, run as a process in a namespace with a profile
//! Dockvpn generated.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use crate::prereq::require_command;
use crate::{Netns, Vnf};

pub const CONNECTED: &str = "Initialization Sequence Completed";

pub struct OpenvpnClient {
    pub process: Vnf,
    profile: PathBuf,
}

impl OpenvpnClient {
    /// `openvpn --config PROFILE EXTRA…` in `ns`, logging to the captured stderr.
    pub fn start(ns: &Netns, profile: &str, extra: &[&str]) -> OpenvpnClient {
        require_command("openvpn", "openvpn");
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "docknfv-{}-{}.ovpn",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, profile).expect("write the profile");
        let mut command = ns.command("openvpn");
        command
            .arg("--config")
            .arg(&path)
            .args(["--log-append", "/dev/stderr", "--connect-retry-max", "3"])
            .args(extra);
        OpenvpnClient {
            process: Vnf::spawn(command),
            profile: path,
        }
    }

    /// Waits for "Initialization Sequence Completed"; the client's log on failure.
    pub fn wait_connected(&self) -> Result<(), String> {
        self.process
            .wait_for_log(CONNECTED, Duration::from_secs(30))
            .map(drop)
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

impl Drop for OpenvpnClient {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.profile);
    }
}

/// `dockvpn client add NAME` then `client config NAME [--remote …]`: the profile text.
pub fn issue_profile(si: &Netns, dockvpn: &Vnf, name: &str, remote: Option<&str>) -> String {
    let added = dockvpn.cli(si, "dockvpn", &["client", "add", name]);
    assert!(added.status.success(), "client add: {}", text(&added));
    let mut args = vec!["client", "config", name];
    if let Some(remote) = remote {
        args.extend(["--remote", remote]);
    }
    let config = dockvpn.cli(si, "dockvpn", &args);
    assert!(config.status.success(), "client config: {}", text(&config));
    String::from_utf8(config.stdout).expect("utf-8 profile")
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

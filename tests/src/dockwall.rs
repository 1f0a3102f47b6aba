//! Dockwall as the SI of a chain, with its own state directory, and its CLI as an operator
//! runs it through `docker exec` (here: `ip netns exec`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::chain::Chain;
use crate::netns::{run_checked, Netns};
use crate::vnf::{binary, Vnf};

/// A state directory removed on drop.
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn new() -> StateDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dockwall-state-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        StateDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn rules_file(&self) -> PathBuf {
        self.0.join("rules.json")
    }
}

impl Default for StateDir {
    fn default() -> Self {
        StateDir::new()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Dockwall in one namespace on its own state directory: the CLI as an operator runs it,
/// and `dockwall run` when started.
pub struct Dockwall<'c> {
    pub si: &'c Netns,
    /// Before `state`, so the process ends before its state directory goes.
    pub process: Option<Vnf>,
    pub state: StateDir,
}

impl<'c> Dockwall<'c> {
    /// Starts `dockwall run` in the chain's SI and waits until it forwards.
    pub fn start(chain: &'c Chain) -> Dockwall<'c> {
        let mut dockwall = Dockwall::launch(chain);
        dockwall.wait_ready();
        dockwall
    }

    /// Starts `dockwall run` without waiting for both sides.
    pub fn launch(chain: &'c Chain) -> Dockwall<'c> {
        Dockwall::launch_in(&chain.si, StateDir::new(), &[])
    }

    /// Starts `dockwall --state-dir STATE run --side-timeout 30 RUN_ARGS` in `si` without
    /// waiting for both sides.
    pub fn launch_in(si: &'c Netns, state: StateDir, run_args: &[&str]) -> Dockwall<'c> {
        crate::prereq::require_command("nft", "nftables");
        let mut dockwall = Dockwall::idle(si, state);
        let mut args = vec!["--side-timeout", "30"];
        args.extend_from_slice(run_args);
        dockwall.process = Some(dockwall.spawn(&args));
        dockwall
    }

    /// Dockwall in `si` on `state` with no `run`: only the CLI.
    pub fn idle(si: &'c Netns, state: StateDir) -> Dockwall<'c> {
        Dockwall {
            si,
            process: None,
            state,
        }
    }

    /// Starts `dockwall --state-dir STATE run RUN_ARGS` in the SI, exactly those arguments;
    /// neither waits nor keeps the process.
    pub fn spawn(&self, run_args: &[&str]) -> Vnf {
        let path = self.state.path().to_str().expect("utf-8 path");
        let mut args = vec!["--state-dir", path, "run"];
        args.extend_from_slice(run_args);
        Vnf::start(self.si, "dockwall", &args)
    }

    /// Starts `dockwall run` again on the same state directory and waits until it forwards.
    pub fn run(&mut self) {
        self.run_with(&[]);
    }

    /// Like `run`, with more options for `run` (`--verify-every 1`).
    pub fn run_with(&mut self, run_args: &[&str]) {
        self.process = Some(self.spawn(run_args));
        self.wait_ready();
    }

    /// The running `dockwall run`.
    pub fn running(&self) -> &Vnf {
        self.process.as_ref().expect("dockwall run started")
    }

    /// Waits until `dockwall status` succeeds; after `timeout` panics with `failure` and
    /// what `run` logged.
    pub fn wait_healthy(&self, timeout: Duration, failure: &str) {
        let deadline = Instant::now() + timeout;
        while !self.cli(&["status"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "{failure} within {} s:\n{}",
                timeout.as_secs(),
                self.process.as_ref().map(Vnf::log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_ready(&mut self) {
        self.process
            .as_ref()
            .expect("dockwall run started")
            .wait_ready();
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            assert!(
                process.terminate().success(),
                "dockwall run did not exit cleanly:\n{}",
                process.log()
            );
        }
    }

    /// `dockwall --state-dir … ARGS` in the SI.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = self
            .si
            .command(binary("dockwall").to_str().expect("utf-8 path"));
        command
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .env_remove("RUST_LOG");
        command
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run dockwall")
    }

    /// Runs the CLI and panics with its stderr unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "dockwall {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The nft table `inet dockwall` as the kernel holds it (empty when absent).
    pub fn table(&self) -> String {
        self.nft_table("inet", "dockwall")
    }

    /// `nft list table FAMILY NAME` in the SI (empty when absent); panics when nft fails for
    /// any other reason, so an unreadable table never passes for a missing one.
    pub fn nft_table(&self, family: &str, name: &str) -> String {
        let output = self.si.exec("nft", &["list", "table", family, name]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            String::from_utf8_lossy(&output.stdout).into_owned()
        } else if stderr.starts_with("Error: No such file or directory") {
            String::new()
        } else {
            panic!(
                "nft list table {family} {name} failed ({}): {stderr}",
                output.status
            );
        }
    }

    /// The sides as `dockwall` finds them now in the SI, with no side options.
    pub fn assignment(&self) -> vnf_core::side::Assignment {
        let selectors = vnf_core::cli::SideArgs {
            left: None,
            right: None,
            mgmt: None,
        }
        .selectors(self.state.path());
        self.si.block_on(async {
            vnf_core::firewall::current_assignment(&selectors)
                .await
                .expect("the sides")
        })
    }

    /// `nft -j list table inet dockwall`, parsed; panics when nft fails.
    pub fn table_json(&self) -> serde_json::Value {
        let json = run_checked(
            self.si
                .command("nft")
                .args(["-j", "list", "table", "inet", "dockwall"]),
        );
        serde_json::from_str(&json).expect("nft JSON")
    }
}

/// A `dockwall apply` file of `count` distinct deny rules in two shapes, none matching the
/// benchmark flows (TCP to port 5201 from 192.168.10.2): TCP from 10.x addresses to port 22,
/// and UDP to 100.64.x.0/24 (past 98,304 rules wrapping round to 100.0.x.0/24).
pub fn deny_rule_set_json(count: usize, default_policy: &str) -> String {
    let rules: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let id = i + 1;
            if i % 2 == 0 {
                serde_json::json!({"id": id, "action": "deny", "direction": "both", "protocol": "tcp",
                    "source": format!("10.{}.{}.{}/32", i >> 16 & 255, i >> 8 & 255, i & 255), "destination_port": "22"})
            } else {
                let j = i / 2;
                serde_json::json!({"id": id, "action": "deny", "direction": "both", "protocol": "udp",
                    "destination": format!("100.{}.{}.0/24", (64 + (j >> 8)) & 255, j & 255)})
            }
        })
        .collect();
    serde_json::json!({"version": 1, "default_policy": default_policy, "rules": rules, "next_id": count + 1}).to_string()
}

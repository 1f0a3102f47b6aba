//! One network namespace, deleted on drop.

use std::fs::File;
use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `dnfv<pid>-<n><role>` with loopback up.
    pub fn new(role: &str) -> Netns {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("dnfv{}-{id}{role}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS`, panicking with the command and its stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut command = Command::new("ip");
        command.arg("-n").arg(&self.name).args(args);
        run_checked(&mut command)
    }

    /// `ip netns exec <ns> PROGRAM ARGS`, returning the output whatever the exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec {} {program}: {e}", self.name))
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    pub fn sysctl(&self, key: &str) -> u32 {
        let output = self.exec("cat", &[&format!("/proc/sys/{}", key.replace('.', "/"))]);
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("cannot read sysctl {key} in {}", self.name))
    }

    pub fn set_sysctl(&self, key: &str, value: u32) {
        let output = self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
        assert!(
            output.status.success(),
            "sysctl {key}={value} in {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A link of this namespace as vnf-core sees it (index, MAC, MTU, addresses).
    pub fn link(&self, name: &str) -> vnf_core::side::Interface {
        let interfaces = self.block_on(async {
            vnf_core::kernel::Kernel::connect()
                .expect("netlink")
                .interfaces()
                .await
                .expect("dump links")
        });
        interfaces
            .into_iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no link {name} in {}", self.name))
    }

    /// Waits until `server`, started in this namespace, has a socket on `port` (`listen` is
    /// `ss`'s `-ltn` for TCP or `-lun` for UDP), so a client's first packet is not lost.
    /// Panics when the server exits first or nothing listens within 10 s.
    pub fn wait_listening(&self, server: &mut Child, listen: &str, port: u16) {
        crate::prereq::require_command("ss", "iproute2");
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{port}");
        loop {
            if let Ok(Some(status)) = server.try_wait() {
                panic!(
                    "the server exited ({status}) before listening on port {port} in {}",
                    self.name
                );
            }
            let output = self.exec("ss", &["-H", listen, &filter]);
            assert!(
                output.status.success(),
                "ss -H {listen} '{filter}' in {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
            if !output.stdout.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on port {port} ({listen}) in {} after 10 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything routing-related in the namespace, to prove a step changed nothing.
    pub fn routing_snapshot(&self) -> String {
        let mut snapshot = self.ip(&["-4", "rule", "show"]);
        snapshot += &self.ip(&["-4", "route", "show", "table", "all"]);
        snapshot
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it opens (netlink,
    /// TCP) live here. The thread gets its own current-thread tokio runtime.
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                    setns(file, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like `run`, for async code.
    pub fn block_on<F, T>(&self, future: F) -> T
    where
        F: std::future::Future<Output = T> + Send,
        T: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(future)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep veths alive but not the name; the VNF guard kills them first.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `command` with `input` on its stdin, capturing stdout and stderr, whatever the exit
/// status.
pub fn output_with_stdin(command: &mut Command, input: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("write the stdin of {command:?}: {e}"));
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {command:?}: {e}"))
}

pub fn run_checked(command: &mut Command) -> String {
    match try_run(command) {
        Ok(stdout) => stdout,
        Err(error) => panic!("{error:#}"),
    }
}

pub fn try_run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

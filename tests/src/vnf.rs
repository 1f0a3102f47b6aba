//! A VNF binary running inside a namespace, killed on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::Netns;

/// The freshly built binary of a workspace package: `cargo build` runs once per test
/// process, so a test never exercises a stale binary. `DOCKNFV_PROFILE=release` builds and
/// uses the release binary (the benchmark does).
pub fn binary(name: &str) -> PathBuf {
    let release = std::env::var("DOCKNFV_PROFILE").is_ok_and(|p| p == "release");
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(&cargo);
        command.args(["build", "--quiet", "--package", name, "--bin", name]);
        if release {
            command.arg("--release");
        }
        let status = command
            .current_dir(&workspace)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cargo} build -p {name}: {e}"));
        assert!(status.success(), "cargo build -p {name} failed");
        built.push(name.to_string());
    }
    let path = target
        .join(if release { "release" } else { "debug" })
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing after cargo build",
        path.display()
    );
    path
}

#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

pub struct Vnf {
    child: Child,
    log: Arc<Log>,
    /// The thread copying stderr into `log`; it ends when the process's stderr closes.
    reader: Option<JoinHandle<()>>,
    pub started: Instant,
    /// The VNFs' default state directory for this process (an explicit --state-dir wins),
    /// so no test writes to /var/lib.
    state_dir: PathBuf,
}

impl Vnf {
    /// Starts `binary ARGS` inside `ns` (`ip netns exec` execs it, so the pid is the VNF's).
    pub fn start(ns: &Netns, binary_name: &str, args: &[&str]) -> Vnf {
        let mut command = ns.command(binary(binary_name).to_str().expect("utf-8 path"));
        command.args(args);
        Vnf::spawn(command)
    }

    /// Starts `binary ARGS` in `ns` with /proc/sys mounted read-only, as in an unprivileged
    /// container.
    pub fn start_with_read_only_proc_sys(ns: &Netns, binary_name: &str, args: &[&str]) -> Vnf {
        let script =
            "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"";
        let mut command = ns.command("unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(binary(binary_name))
            .args(args);
        Vnf::spawn(command)
    }

    /// The state directory the VNF uses, for its CLI subcommands run beside it.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Runs `binary ARGS` (a CLI subcommand) in `ns` against this VNF's state directory.
    pub fn cli(&self, ns: &Netns, binary_name: &str, args: &[&str]) -> std::process::Output {
        let mut command = ns.command(binary(binary_name).to_str().expect("utf-8 path"));
        command
            .args(args)
            .env("DOCKWALL_STATE_DIR", &self.state_dir)
            .env("DOCKVPN_STATE_DIR", &self.state_dir)
            .env_remove("VNF_LEFT")
            .env_remove("VNF_RIGHT");
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
    }

    /// Starts any program (not only a VNF) with its stderr captured like a VNF's log.
    pub fn spawn(mut command: Command) -> Vnf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let state_dir = std::env::temp_dir().join(format!(
            "vnf-state-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        command
            .env("DOCKWALL_STATE_DIR", &state_dir)
            .env("DOCKVPN_STATE_DIR", &state_dir)
            .env("RUST_LOG", "info")
            .env_remove("VNF_LEFT")
            .env_remove("VNF_RIGHT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line);
                sink.changed.notify_all();
            }
        });
        Vnf {
            child,
            log,
            reader: Some(reader),
            started,
            state_dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Waits until a stderr line contains `needle`; returns that line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                return Err(format!(
                    "no log line with {needle:?} within {timeout:?}; log:\n{}",
                    self.log()
                ));
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for "forwarding ready", panicking with the log if it does not come.
    pub fn wait_ready(&self) {
        if let Err(error) = self.wait_for_log("forwarding ready", Duration::from_secs(10)) {
            panic!("{error}");
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The last lines are what tests assert on: read them all.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "process did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Vnf {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

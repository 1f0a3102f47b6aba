//! `cargo xtask images`: the Docker engine (started when none answers) and the images, built
//! offline when no registry is reachable.
//!
//! The VNF binaries are built by cargo on the host and copied into each image: there is no
//! Rust toolchain image to pull here, the host toolchain and the workspace lock file are the
//! ones CI tests, and the binaries need only glibc, which the Debian 12 base provides.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cargo, run};

/// The base the Dockerfiles are written for.
const UPSTREAM_BASE: &str = "debian:bookworm-slim";
/// The equivalent base bootstrapped locally when the upstream one cannot be pulled.
const LOCAL_BASE: &str = "docknfv/bookworm-minbase:latest";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const DOCKERD_LOG: &str = "/var/log/docknfv-dockerd.log";

/// Directories under images/, each built as `docknfv/<name>:latest`; `true` when the image
/// ships the release binary of the same name.
const IMAGES: &[(&str, bool)] = &[
    ("dockwall", true),
    ("dockvpn", true),
    ("dnsmasq", false),
    ("host", false),
    ("prometheus", false),
];

pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Cargo's target directory as `cargo metadata` reports it, so `CARGO_TARGET_DIR` (and a
/// configured `build.target-dir`) is honoured: the release binaries are where cargo put them.
fn target_dir() -> Result<PathBuf, String> {
    let output = Command::new(crate::cargo_program())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo metadata failed: {}", output.status));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| "cargo metadata names no target_directory".to_string())
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn daemon_answers() -> bool {
    succeeds(Command::new("docker").arg("info"))
}

/// Starts `dockerd` in the background unless a daemon already answers.
pub fn ensure_daemon() -> Result<(), String> {
    if daemon_answers() {
        return Ok(());
    }
    eprintln!("+ dockerd (log: {DOCKERD_LOG})");
    let log =
        std::fs::File::create(DOCKERD_LOG).map_err(|e| format!("create {DOCKERD_LOG}: {e}"))?;
    Command::new("dockerd")
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start dockerd: {e} (apt-get install docker.io)"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if daemon_answers() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(format!(
        "dockerd did not answer within 60 s; see {DOCKERD_LOG}"
    ))
}

fn image_exists(image: &str) -> bool {
    succeeds(Command::new("docker").args(["image", "inspect", image]))
}

/// The upstream base if present or pullable, else the local bootstrap (made once).
fn base_image() -> Result<String, String> {
    if image_exists(UPSTREAM_BASE) {
        return Ok(UPSTREAM_BASE.into());
    }
    if image_exists(LOCAL_BASE) {
        return Ok(LOCAL_BASE.into());
    }
    eprintln!("+ docker pull {UPSTREAM_BASE}");
    if succeeds(Command::new("timeout").args(["60", "docker", "pull", UPSTREAM_BASE])) {
        return Ok(UPSTREAM_BASE.into());
    }
    eprintln!("{UPSTREAM_BASE} cannot be pulled (no registry access); bootstrapping {LOCAL_BASE} with debootstrap");
    let rootfs = target_dir()?.join("docker-base/rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs).map_err(|e| format!("create {}: {e}", rootfs.display()))?;
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&rootfs)
        .arg(DEBIAN_MIRROR))?;
    // What bookworm-slim leaves out too: downloaded packages, docs, man pages, locales.
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
    ] {
        clear_dir(&rootfs.join(dir))?;
    }
    let script = format!(
        "tar -C '{}' -c . | docker import --change 'CMD [\"bash\"]' - {LOCAL_BASE}",
        rootfs.display()
    );
    run(Command::new("sh").args(["-c", &script]))?;
    let _ = std::fs::remove_dir_all(&rootfs);
    Ok(LOCAL_BASE.into())
}

fn clear_dir(dir: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| format!("remove {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Builds every image; prints their sizes.
pub fn build() -> Result<(), String> {
    ensure_daemon()?;
    cargo(&[
        "build",
        "--release",
        "--quiet",
        "-p",
        "dockwall",
        "-p",
        "dockvpn",
    ])?;
    let base = base_image()?;
    let root = workspace();
    let target = target_dir()?;
    for &(name, ships_binary) in IMAGES {
        let context = target.join("images").join(name);
        let _ = std::fs::remove_dir_all(&context);
        std::fs::create_dir_all(&context)
            .map_err(|e| format!("create {}: {e}", context.display()))?;
        let mut files = vec![
            (
                root.join("images").join(name).join("Dockerfile"),
                "Dockerfile",
            ),
            (
                root.join("images/common/runtime-closure.sh"),
                "runtime-closure.sh",
            ),
        ];
        if ships_binary {
            files.push((target.join("release").join(name), name));
        }
        for (source, file) in files {
            std::fs::copy(&source, context.join(file)).map_err(|e| {
                format!("copy {} into {}: {e}", source.display(), context.display())
            })?;
        }
        // The legacy builder needs no BuildKit frontend image; host networking lets apt
        // reach the Debian mirror the host uses.
        run(Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "--quiet", "--network", "host", "--build-arg"])
            .arg(format!("BASE={base}"))
            .arg("--tag")
            .arg(format!("docknfv/{name}:latest"))
            .arg(&context))?;
    }
    let sizes = Command::new("docker")
        .args([
            "image",
            "ls",
            "--format",
            "{{.Repository}}:{{.Tag}}\t{{.Size}}",
            "docknfv/*",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    println!(
        "images (base {base}):\n{}",
        String::from_utf8_lossy(&sizes.stdout)
    );
    Ok(())
}

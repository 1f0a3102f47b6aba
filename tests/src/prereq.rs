//! Missing prerequisites fail loudly, naming what to install; nothing skips silently.

use std::path::Path;

/// Panics unless running as root (namespaces, veth and sysctls need it).
pub fn require_root() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("these tests create network namespaces and need root: run them as root (cargo xtask test does)");
    }
}

/// Panics unless `command` is on PATH, naming the Debian package that provides it.
pub fn require_command(command: &str, debian_package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
        .unwrap_or(false);
    if !found && !Path::new(command).is_file() {
        panic!("`{command}` is missing: apt-get install {debian_package} (cargo xtask test installs it)");
    }
}

/// Everything the namespace chain needs.
pub fn require_chain_tools() {
    require_root();
    require_command("ip", "iproute2");
    require_command("ping", "iputils-ping");
    require_command("unshare", "util-linux");
}

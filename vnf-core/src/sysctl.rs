//! Forwarding sysctls. Strict reverse-path filtering (rp_filter=1) silently drops
//! cross-routed traffic, because the kernel checks the source against `main`, not against
//! the table the packet is forwarded by; loose (2) or off (0) works.

use std::fs;
use std::io;
use std::path::PathBuf;

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::reported::Reported;

const FORWARD: &str = "net.ipv4.ip_forward";
const FWMARK_REFLECT: &str = "net.ipv4.fwmark_reflect";
const RP_FILTER_ALL: &str = "net.ipv4.conf.all.rp_filter";
const RP_FILTER_LOOSE: u32 = 2;
const RP_FILTER_STRICT: u32 = 1;

/// Reads and writes sysctls under a root: `/proc/sys`, or a directory in unit tests.
pub struct Sysctls {
    root: PathBuf,
    /// fwmark_reflect as last warned about: checked on every convergence, warned once.
    fwmark_reflect: Reported<u32>,
}

impl Default for Sysctls {
    fn default() -> Self {
        Sysctls::at("/proc/sys")
    }
}

enum Write {
    Done,
    ReadOnly,
}

impl Sysctls {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Sysctls {
            root: root.into(),
            fwmark_reflect: Reported::default(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key.replace('.', "/"))
    }

    pub fn read(&self, key: &str) -> Result<u32> {
        let path = self.path(key);
        let text = fs::read_to_string(&path).map_err(|source| Error::Io {
            context: format!("read sysctl {key} ({})", path.display()),
            source,
        })?;
        text.trim().parse().map_err(|_| Error::Io {
            context: format!("read sysctl {key}"),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected value {text:?}"),
            ),
        })
    }

    fn write(&self, key: &str, value: u32) -> Result<Write> {
        match fs::write(self.path(key), format!("{value}\n")) {
            Ok(()) => Ok(Write::Done),
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EROFS | libc::EACCES | libc::EPERM)
                ) =>
            {
                Ok(Write::ReadOnly)
            }
            Err(source) => Err(Error::Io {
                context: format!("write sysctl {key}={value}"),
                source,
            }),
        }
    }

    /// Reads `key`, sets it to `wanted` when it differs and /proc/sys allows, and returns
    /// the value in force afterwards.
    fn ensure(&self, key: &str, wanted: u32) -> Result<u32> {
        let current = self.read(key)?;
        if current == wanted {
            return Ok(current);
        }
        match self.write(key, wanted)? {
            Write::Done => {
                info!(sysctl = key, from = current, to = wanted, "set sysctl");
                Ok(wanted)
            }
            Write::ReadOnly => Ok(current),
        }
    }

    /// Enables IPv4 forwarding and loose reverse-path filtering on `all` and the given
    /// interfaces. With a read-only /proc/sys (an unprivileged container) values that
    /// already work are accepted; wrong ones fail with the `--sysctl` flags that fix them.
    /// The fwmark_reflect warning is logged once, and again only after the value changed.
    pub fn ensure_forwarding(&mut self, interfaces: &[&str]) -> Result<()> {
        let forward = self.ensure(FORWARD, 1)?;
        let all = self.ensure(RP_FILTER_ALL, RP_FILTER_LOOSE)?;
        let mut per_interface = Vec::new();
        for interface in interfaces {
            let key = format!("net.ipv4.conf.{interface}.rp_filter");
            per_interface.push((key.clone(), self.ensure(&key, RP_FILTER_LOOSE)?));
        }
        let fwmark_reflect = self.ensure(FWMARK_REFLECT, 1)?;
        if self.fwmark_reflect.changed(fwmark_reflect) && fwmark_reflect != 1 {
            // Only the SI's own resets and ICMP errors for forwarded traffic depend on it.
            warn!("{FWMARK_REFLECT} is 0 and /proc/sys is read-only: TCP resets and ICMP errors the SI sends for forwarded traffic get lost; pass --sysctl {FWMARK_REFLECT}=1");
        }
        match refusal_message(forward, all, &per_interface) {
            None => Ok(()),
            Some(message) => Err(Error::Sysctl(message)),
        }
    }
}

/// The error for values still wrong after every write was tried, or None when they work.
fn refusal_message(forward: u32, all: u32, per_interface: &[(String, u32)]) -> Option<String> {
    let mut wrong = Vec::new();
    let mut flags = Vec::new();
    if forward != 1 {
        wrong.push(format!("{FORWARD} is {forward}"));
        flags.push(format!("--sysctl {FORWARD}=1"));
    }
    // The kernel applies the larger of `all` and the interface's value.
    let strict: Vec<String> = if per_interface.is_empty() {
        (all == RP_FILTER_STRICT)
            .then(|| format!("{RP_FILTER_ALL} is 1 (strict)"))
            .into_iter()
            .collect()
    } else {
        per_interface
            .iter()
            .filter(|(_, value)| all.max(*value) == RP_FILTER_STRICT)
            .map(|(key, value)| format!("{key} is {value} with {RP_FILTER_ALL}={all} (strict)"))
            .collect()
    };
    if !strict.is_empty() {
        wrong.extend(strict);
        // An interface attached later cannot get a docker --sysctl of its own; `all` covers it.
        flags.push(format!("--sysctl {RP_FILTER_ALL}={RP_FILTER_LOOSE}"));
    }
    if wrong.is_empty() {
        return None;
    }
    Some(format!(
        "{} and /proc/sys is read-only, so the SI cannot forward (strict rp_filter silently drops cross-routed traffic). Start the container with {} (docker run), or the same under `sysctls:` in compose",
        wrong.join(", "),
        flags.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempTree(PathBuf);

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tree(name: &str, values: &[(&str, u32)]) -> (TempTree, Sysctls) {
        let root = std::env::temp_dir().join(format!("vnf-sysctl-{}-{name}", std::process::id()));
        for (key, value) in values {
            let path = root.join(key.replace('.', "/"));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, format!("{value}\n")).unwrap();
        }
        let sysctls = Sysctls::at(&root);
        (TempTree(root), sysctls)
    }

    #[test]
    fn writable_values_are_corrected() {
        let (_tree, mut sysctls) = tree(
            "writable",
            &[
                (FORWARD, 0),
                (FWMARK_REFLECT, 0),
                (RP_FILTER_ALL, 1),
                ("net.ipv4.conf.eth0.rp_filter", 1),
            ],
        );
        sysctls.ensure_forwarding(&["eth0"]).unwrap();
        assert_eq!(sysctls.read(FORWARD).unwrap(), 1);
        assert_eq!(sysctls.read(RP_FILTER_ALL).unwrap(), 2);
        assert_eq!(sysctls.read("net.ipv4.conf.eth0.rp_filter").unwrap(), 2);
        assert_eq!(sysctls.read(FWMARK_REFLECT).unwrap(), 1);
        assert_eq!(sysctls.read(FWMARK_REFLECT).unwrap(), 1);
    }

    #[test]
    fn missing_interface_sysctl_is_an_error_naming_it() {
        let (_tree, mut sysctls) = tree(
            "missing",
            &[(FORWARD, 1), (FWMARK_REFLECT, 1), (RP_FILTER_ALL, 2)],
        );
        let error = sysctls
            .ensure_forwarding(&["eth9"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("net.ipv4.conf.eth9.rp_filter"), "{error}");
    }

    #[test]
    fn values_that_work_need_no_write() {
        assert_eq!(
            refusal_message(1, 2, &[("net.ipv4.conf.eth0.rp_filter".into(), 1)]),
            None
        );
        assert_eq!(
            refusal_message(1, 0, &[("net.ipv4.conf.eth0.rp_filter".into(), 0)]),
            None
        );
        assert_eq!(refusal_message(1, 2, &[]), None);
        assert_eq!(
            refusal_message(1, 1, &[("net.ipv4.conf.eth0.rp_filter".into(), 2)]),
            None
        );
    }

    #[test]
    fn strict_or_no_forwarding_names_the_flags() {
        let message = refusal_message(0, 1, &[("net.ipv4.conf.eth0.rp_filter".into(), 1)]).unwrap();
        assert!(message.contains("net.ipv4.ip_forward is 0"), "{message}");
        assert!(
            message
                .contains("--sysctl net.ipv4.ip_forward=1 --sysctl net.ipv4.conf.all.rp_filter=2"),
            "{message}"
        );

        let message = refusal_message(1, 0, &[("net.ipv4.conf.eth1.rp_filter".into(), 1)]).unwrap();
        assert!(
            message.contains(
                "net.ipv4.conf.eth1.rp_filter is 1 with net.ipv4.conf.all.rp_filter=0 (strict)"
            ),
            "{message}"
        );
        assert!(
            message.contains("--sysctl net.ipv4.conf.all.rp_filter=2"),
            "{message}"
        );
    }
}

//! dnsmasq as the DHCP server of a virtual network, in the role Neutron and the Contrail
//! vRouter play: it hands out addresses and option 121 host routes. Killed on drop.

use std::path::PathBuf;
use std::process::{Child, Stdio};

use crate::dockwall::StateDir;
use crate::netns::Netns;
use crate::prereq::require_command;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub struct Dnsmasq {
    child: Child,
    files: StateDir,
}

impl Dnsmasq {
    /// Serves `range` (e.g. "10.0.1.50,10.0.1.99,255.255.255.0,120s") on `interface` of `ns`,
    /// with the DHCP options in `options` (dnsmasq `dhcp-option` syntax, one per line) read
    /// from a file that `reload` rewrites.
    pub fn start(ns: &Netns, interface: &str, range: &str, options: &[&str]) -> Dnsmasq {
        require_command("dnsmasq", "dnsmasq-base");
        let files = StateDir::new();
        std::fs::create_dir_all(files.path()).expect("dnsmasq dir");
        write_options(&files, options);
        let mut child = ns
            .command("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--user=root",
                "--bind-interfaces",
                // As Neutron runs it: requests for addresses it did not lease get a NAK.
                "--dhcp-authoritative",
                &format!("--interface={interface}"),
                &format!("--dhcp-range={range}"),
                &format!("--dhcp-leasefile={}", files.path().join("leases").display()),
                &format!("--dhcp-optsfile={}", options_file(&files).display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        // Bound before clients start asking: a missed first DISCOVER costs seconds.
        ns.wait_listening(&mut child, "-lun", 67);
        Dnsmasq { child, files }
    }

    /// New options, read by dnsmasq on SIGHUP; they reach clients at their next renewal.
    pub fn reload(&self, options: &[&str]) {
        write_options(&self.files, options);
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGHUP);
    }

    /// Stops serving (the lease can then only run out).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn options_file(files: &StateDir) -> PathBuf {
    files.path().join("options")
}

fn write_options(files: &StateDir, options: &[&str]) {
    std::fs::write(options_file(files), options.join("\n") + "\n").expect("write dnsmasq options");
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Source NAT for VPN clients leaving through the left side, in a table of our own
//! (`ip dockvpn`), replaced atomically in one `nft -f` transaction.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use vnf_core::{Error, Result};

const TABLE: &str = "ip dockvpn";

pub fn apply(left_interface: &str, pool: Ipv4Net) -> Result<()> {
    nft(&format!(
        "table {TABLE} {{}}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             oifname \"{left_interface}\" ip saddr {pool} masquerade\n\
           }}\n\
         }}\n"
    ))
}

pub fn remove() -> Result<()> {
    nft(&format!("table {TABLE} {{}}\ndelete table {TABLE}\n"))
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| Error::Nft(format!("run nft: {error} (install the nftables package)")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|error| Error::Nft(format!("write to nft: {error}")))?;
    let output = child
        .wait_with_output()
        .map_err(|error| Error::Nft(format!("wait for nft: {error}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Nft(format!(
            "nft refused the masquerade table: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

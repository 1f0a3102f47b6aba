//! Source NAT for VPN clients leaving through the left side, in a table of our own
//! (`ip dockvpn`), replaced atomically in one `nft -f` transaction.

use ipnet::Ipv4Net;
use vnf_core::Result;

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
    vnf_core::firewall::nft::nft(&["-f", "-"], Some(script)).map(drop)
}

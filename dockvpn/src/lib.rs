//! Dockvpn's library half: the sans-IO OpenVPN and WireGuard engines, the address book
//! that routes tun packets between them, and the PKI, which the binary (`main.rs`) drives
//! and the fuzz targets (`fuzz/`, entry points in `fuzzing`) exercise.

pub mod access;
pub mod address_book;
pub mod datapath;
pub mod dropped;
pub mod engine;
pub mod fuzzing;
pub mod openvpn;
pub mod password;
pub mod pki;
pub mod refusal;
pub mod wireguard;

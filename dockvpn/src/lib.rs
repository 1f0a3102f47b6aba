//! Dockvpn's library half: the sans-IO OpenVPN engine and the PKI, which the binary
//! (`main.rs`) drives and the fuzz targets (`fuzz/`, entry points in `fuzzing`) exercise.

pub mod fuzzing;
pub mod openvpn;
pub mod pki;

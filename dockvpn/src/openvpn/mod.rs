//! An OpenVPN-protocol server (UDP, TLS mode, optional tls-crypt-v2, tls-crypt or tls-auth) as a sans-IO engine: `server::Server`
//! is fed datagrams, tun packets and time and returns datagrams, tun packets and events.

pub mod compression;
pub mod cookie;
pub mod data;
#[cfg(test)]
mod engine_tests;
pub mod keymethod;
pub mod link;
pub mod packet;
pub mod prf;
pub mod reliable;
pub mod server;
pub mod session;
pub mod tcp_framing;
pub mod tls_auth;
pub mod tls_crypt;
pub mod tls_crypt_v2;
pub mod wrap;

//! An OpenVPN-protocol server (UDP and TCP, TLS mode, optional tls-crypt) as a sans-IO engine: `server::Server`
//! is fed datagrams, tun packets and time and returns datagrams, tun packets and events.

pub mod data;
#[cfg(test)]
mod engine_tests;
pub mod keymethod;
pub mod link;
pub mod packet;
pub mod reliable;
pub mod server;
pub mod session;
pub mod tcp_framing;
pub mod tls_crypt;

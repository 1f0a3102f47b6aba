//! The service-chain harness: real network namespaces and veth pairs, the real VNF binaries
//! started inside them, real traffic. Every namespace name is unique per test, and every
//! namespace and process is removed on drop, also when a test panics, so suites run in
//! parallel.

pub mod chain;
pub mod compose;
pub mod demo;
pub mod dhcp_server;
pub mod dnsmasq;
pub mod docker;
pub mod dockwall;
pub mod dockwall_api;
pub mod graph;
pub mod measure;
pub mod netns;
pub mod openvpn;
pub mod prereq;
pub mod traffic;
pub mod vnf;
pub mod wire;
pub mod wireguard;

pub use chain::Chain;
pub use netns::Netns;
pub use vnf::Vnf;

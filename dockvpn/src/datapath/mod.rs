//! The VPN data path below the engines: the tun device with its offloads, the sans-IO
//! segmentation of what the tun hands over, and batched UDP sockets. The driver (`vpn.rs`)
//! moves packets between them and the engines in reused buffers.

pub mod offload;
pub mod tun;
pub mod udp;

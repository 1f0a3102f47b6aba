//! The DHCPv4 client: `options` reads replies and their routes, `client` is the sans-IO
//! state machine. Applying a lease to the kernel is `crate::lease`.

pub mod client;
pub mod client_status;
pub mod driver;
pub mod options;
pub mod socket;

//! vnf-core: the runtime shared by the docknfv VNFs.
//!
//! A VNF is a process in a network namespace with a left and a right interface. This crate
//! finds those sides (`side`), routes between them (`routing`: a table per side in cross
//! mode, `main` in global mode), keeps the forwarding sysctls right (`sysctl`) and runs the
//! loop that reacts to interfaces appearing late (`runtime`).

pub mod cli;
pub mod clock;
pub mod dhcp;
pub mod error;
pub mod firewall;
pub mod fs;
pub mod fuzzing;
pub mod kernel;
pub mod lease;
pub mod metrics;
pub mod reported;
pub mod route_guard;
pub mod routing;
pub mod runtime;
pub mod side;
pub mod side_memory;
pub mod status;
pub mod sysctl;
pub mod transparent;

pub use error::{Error, Result};

//! # cohort
//!
//! Privacy-preserving federated learning in Rust. This facade re-exports the workspace's
//! crates and hosts the cross-crate loopback tests (`tests/`):
//!
//! - [`common`]: protocol logic, model, training and data, with no I/O.
//! - [`io`]: the transport and files the drivers share.
//! - [`server`]: the aggregation server and operator CLI.
//! - [`client`]: the client daemon.
//! - [`scenarios`]: simulated federations (`cohort-sim`).

pub use cohort_client as client;
pub use cohort_common as common;
pub use cohort_io as io;
pub use cohort_scenarios as scenarios;
pub use cohort_server as server;

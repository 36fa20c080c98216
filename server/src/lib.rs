//! # cohort-server
//!
//! The aggregation server and the operator's CLI `cohort-server`.
//!
//! - [`pki`]: the operator's CA: `init` (CA + server certificate; the CA can be kept offline),
//!   `enroll` (sign a client's request or make a bundle, and register the certificate),
//!   `register` (a certificate the offline CA signed), certificate lifetimes, the state
//!   directory's file names.
//! - [`config`]: `server.toml` and its `[federation]` table.
//! - [`store`]: SQLite records (`cohort.db`): clients, the registry of their certificates (the
//!   only ones admitted; revocation is by certificate), rounds.
//! - [`serve`]: the driver: QUIC endpoint with mutual TLS, bounded connections (a cap on those
//!   that have not said hello, one per identity, revoked ones closed within a second), and the
//!   loop that feeds `cohort_common::round` with updates, then checkpoints, evaluates and records.
//! - [`metrics`]: the Prometheus endpoint (`metrics_listen`): rounds, dropouts, per-head
//!   accuracy, epsilon against model observers and against the server, cheaters caught, clients
//!   connected.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cohort_server::{config::ServerConfig, pki::{self, StatePaths}, serve::{Server, ServeSetup}};
//! let state = StatePaths::new("state");
//! pki::init(&state, "demo", &["localhost".into()], None)?;
//! let config = ServerConfig::load("server.toml".as_ref())?;
//! let server = Server::bind(ServeSetup {
//!     identity: pki::server_identity(&state)?,
//!     listen: config.listen,
//!     spec: config.spec,
//!     test_data: config.test_data.map(|d| d.load()).transpose()?,
//!     head_tests: Vec::new(),
//!     federation: config.federation,
//!     state,
//!     events: None,
//!     metrics_listen: config.metrics_listen,
//! })?;
//! let reports = server.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

pub mod config;
mod connections;
pub mod metrics;
pub mod pki;
pub mod serve;
pub mod store;

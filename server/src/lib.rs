//! # cohort-server
//!
//! The aggregation server and the operator's CLI `cohort-server`.
//!
//! - [`pki`]: the operator's CA: `init` (CA + server certificate; the CA can be kept offline),
//!   `enroll` (sign a client's request or make a bundle, and register the certificate),
//!   `register` (a certificate the offline CA signed), certificate lifetimes, the state
//!   directory's file names.
//! - [`config`]: `server.toml` (where to listen, and optionally a run) and run files (a model,
//!   its test set and its `[federation]` table).
//! - [`store`]: SQLite records (`cohort.db`): the runs, clients, the registry of their certificates (the
//!   only ones admitted; revocation is by certificate), rounds.
//! - [`serve`]: hosts the federation's runs one after another (server.toml's, then those
//!   `cohort-server submit` queued in cohort.db), keeping the endpoint and connections between
//!   them. Each run is driven by `serve::driver` (private), the event loop around the run's
//!   state machine (`cohort_common::coordinator::Coordinator`): replies first, then clients
//!   coming and going, then the timer; it sends each request on a stream, hands back replies,
//!   writes checkpoints and records rounds, and makes no protocol decision.
//! - `connections` (private): the QUIC accept loop with its bounds (a cap on connections that
//!   have not said hello, one per identity, deadlines), admission of registered, unrevoked
//!   certificates, the hello and welcome, the registry of connected clients, and the watch that
//!   closes revoked ones within a second.
//! - [`resume`]: what cohort.db and the checkpoint files remember of earlier runs, for
//!   the coordinator (interrupted rounds marked first), and [`resume::read_checkpoint`], which
//!   checks a checkpoint's name and contents before it is resumed from or exported.
//! - `publish` (private): test-set evaluation off the loop, then reports, logs and metrics in
//!   round order.
//! - [`runs`]: `submit`, `stop`, `resume` of runs, and where a run's records are.
//! - [`live`]: `live.json`, what the running server is doing, for `cohort-server status`.
//! - [`metrics`]: the Prometheus endpoint (`metrics_listen`): rounds, dropouts, per-head
//!   accuracy, epsilon against model observers and against the server, cheaters caught, clients
//!   connected.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cohort_server::{config::ServerConfig, pki::{self, StatePaths}, serve::{RunSetup, Server, ServeSetup}};
//! let state = StatePaths::new("state");
//! pki::init(&state, "demo", &["localhost".into()], None)?;
//! let config = ServerConfig::load("server.toml".as_ref())?;
//! let server = Server::bind(ServeSetup {
//!     identity: pki::server_identity(&state)?,
//!     listen: config.listen,
//!     run: config.run.map(RunSetup::load).transpose()?,
//!     keep_serving: config.keep_serving,
//!     state,
//!     events: None,
//!     metrics_listen: config.metrics_listen,
//! })?;
//! let reports = server.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

pub mod config;
mod connections;
pub mod live;
pub mod metrics;
pub mod pki;
mod publish;
pub mod resume;
pub mod runs;
pub mod serve;
pub mod store;

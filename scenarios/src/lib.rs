//! # cohort-scenarios
//!
//! Whole simulated federations in one process, over real QUIC with mutual TLS on loopback,
//! for tests and benchmarks; the runner behind `cohort-sim`.
//!
//! - [`bundled`]: the scenarios and model specs compiled in, and where the data sets are found.
//! - [`fleet`]: writes what a real fleet needs (a server state directory, and per client its
//!   identity, `client.toml` and data partition): `cohort-sim fleet`.
//! - [`split`]: a data set cut into per-client NumPy parts for trials: `cohort-sim split`.
//! - [`scenario`]: the scenario file (model, clients, data, partition, `[federation]`).
//! - [`runner`]: sets up a CA, a server and the client daemons, runs every round and
//!   collects a [`runner::Report`].
//! - [`report`]: `report.json` and the accuracy plot.
//! - [`throughput`]: local training steps per second on a device (`cohort-sim train-bench`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cohort_scenarios::{scenario::Scenario, runner};
//! let scenario = Scenario::load("scenarios/quickstart.toml".as_ref())?;
//! let report = runner::run(&scenario, &runner::RunOptions::default()).await?;
//! println!("final accuracy {:?}", report.final_accuracy);
//! # Ok(()) }
//! ```

pub mod bundled;
pub mod fleet;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod split;
pub mod throughput;

/// Refuses an `--out` folder that exists and is not empty; `never` says what the tool never
/// does (`fleet never overwrites a CA or keys`).
pub(crate) fn require_new_out(out: &std::path::Path, never: &str) -> Result<(), String> {
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(format!("{} exists and is not an empty folder; give a new --out ({never})", out.display()));
    }
    Ok(())
}

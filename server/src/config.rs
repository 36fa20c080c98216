//! `server.toml`: where to listen, which model, the test set, and the federation's rounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cohort_common::model::ModelSpec;
use cohort_common::strategy::StrategyConfig;
use cohort_common::train::TrainConfig;
use cohort_io::files::{read_toml, DataSource, FileError};
use serde::{Deserialize, Serialize};

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}
fn ten() -> usize {
    10
}
fn one() -> usize {
    1
}
fn round_timeout() -> f64 {
    120.0
}
fn wait_for_clients() -> f64 {
    600.0
}

/// How collected updates are combined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Collection {
    /// The server sees each update: for debugging and comparison.
    #[default]
    Plain,
}

/// The rounds of a federation; the `[federation]` table of `server.toml` and of scenarios.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Federation {
    /// Rounds to run (in total, counting rounds run before a restart).
    pub rounds: u64,
    /// Cohort size: how many connected clients are sampled each round.
    #[serde(default = "ten")]
    pub clients_per_round: usize,
    /// Fewest updates that make a round; fewer and the round aborts, the model unchanged.
    #[serde(default = "one")]
    pub min_clients: usize,
    /// Wait for this many connected clients before the first round (default: min_clients).
    #[serde(default)]
    pub start_after_clients: Option<usize>,
    /// Seconds a cohort has to deliver its updates.
    #[serde(default = "round_timeout")]
    pub round_timeout_secs: f64,
    /// Seconds to wait for enough connected clients before giving up.
    #[serde(default = "wait_for_clients")]
    pub wait_for_clients_secs: f64,
    /// Seed of the model initialisation, the cohort sampling and the clients' shuffling.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub collection: Collection,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub strategy: StrategyConfig,
}

impl Federation {
    /// Checks the values together; the message names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.rounds == 0 {
            return Err("federation.rounds must be at least 1".into());
        }
        if self.clients_per_round == 0 {
            return Err("federation.clients_per_round must be at least 1".into());
        }
        if self.min_clients == 0 || self.min_clients > self.clients_per_round {
            return Err(format!(
                "federation.min_clients = {} must be between 1 and clients_per_round = {}",
                self.min_clients, self.clients_per_round
            ));
        }
        for (name, v) in
            [("round_timeout_secs", self.round_timeout_secs), ("wait_for_clients_secs", self.wait_for_clients_secs)]
        {
            if !(v.is_finite() && v > 0.0 && v < 1e7) {
                return Err(format!("federation.{name} = {v} must be a positive number of seconds"));
            }
        }
        self.train.check().map_err(|e| format!("federation.train: {e}"))?;
        self.strategy.build(0).map_err(|e| format!("federation.strategy: {e}"))?;
        Ok(())
    }
}

/// `server.toml` as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfigFile {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The model spec (TOML), relative to this file.
    pub model: PathBuf,
    /// An operator test set to evaluate the global model on after each round.
    #[serde(default)]
    pub test_data: Option<DataSource>,
    pub federation: Federation,
}

/// `server.toml` read, checked and with its files loaded.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub spec: ModelSpec,
    pub test_data: Option<DataSource>,
    pub federation: Federation,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let file: ServerConfigFile = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let bad = |message: String| FileError::Config { path: path.display().to_string(), message };
        file.federation.check().map_err(bad)?;
        let model_path = base.join(&file.model);
        let text = std::fs::read_to_string(&model_path)
            .map_err(|source| FileError::Io { path: model_path.display().to_string(), source })?;
        let spec = ModelSpec::from_toml(&text)
            .map_err(|e| FileError::Config { path: model_path.display().to_string(), message: e.to_string() })?;
        Ok(Self {
            listen: file.listen,
            spec,
            test_data: file.test_data.map(|d| d.resolve(base)),
            federation: file.federation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_configs_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(dir.path().join("m.toml"), cohort_common::specs::MNIST_2NN).unwrap();
        std::fs::write(&path, "model = 'm.toml'\n[federation]\nrounds = 3\nclients_per_round = 2\nmin_clients = 5\n")
            .unwrap();
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("server.toml") && err.contains("min_clients"), "{err}");
        std::fs::write(&path, "model = 'm.toml'\n[federation]\nrounds = 3\n[federation.train]\nlr = -1.0\n").unwrap();
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("lr = -1"), "{err}");
        std::fs::write(&path, "model = 'missing.toml'\n[federation]\nrounds = 3\n").unwrap();
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("missing.toml"), "{err}");
        std::fs::write(&path, "model = 'm.toml'\n[federation]\nrounds = 3\n").unwrap();
        let ok = ServerConfig::load(&path).unwrap();
        assert_eq!(ok.spec.name, "mnist-2nn");
        assert_eq!(ok.federation.clients_per_round, 10);
    }
}

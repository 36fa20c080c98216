//! `server.toml`: where to listen, which model, the test set, and the federation's rounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cohort_common::model::ModelSpec;
use cohort_common::secagg::quantize::Quantizer;
use cohort_common::secagg::{crypto, SecAggParams, SecAggSetup};
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
    /// SecAgg+: the server learns only the sum of the cohort's updates.
    #[default]
    Secure,
    /// The server sees each update: for debugging and comparison only.
    Plain,
}

fn degree() -> usize {
    8
}
fn threshold() -> usize {
    5
}
fn tolerance() -> f64 {
    0.3
}
fn bits() -> u32 {
    32
}
fn clip() -> f64 {
    4.0
}
fn sample_cap() -> u64 {
    10_000
}
fn phase_timeout() -> f64 {
    30.0
}

/// `[federation.secagg]`: secure aggregation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggConfig {
    /// Neighbours per client (k); the graph is complete for cohorts of at most k + 1.
    #[serde(default = "degree")]
    pub degree: usize,
    /// Shares needed to rebuild a secret (t): more than k / 2.
    #[serde(default = "threshold")]
    pub threshold: usize,
    /// Fraction of a neighbourhood that may drop with the sum still exact.
    #[serde(default = "tolerance")]
    pub dropout_tolerance: f64,
    /// Modulus 2^bits: 32 or 64.
    #[serde(default = "bits")]
    pub bits: u32,
    /// Each coordinate of a weighted update is clipped to [-clip, clip] before quantization.
    #[serde(default = "clip")]
    pub clip: f64,
    /// Sample count that earns a client the full FedAvg weight (weights = min(samples / cap, 1)).
    #[serde(default = "sample_cap")]
    pub sample_cap: u64,
    /// Seconds each key-exchange and unmasking phase may take.
    #[serde(default = "phase_timeout")]
    pub phase_timeout_secs: f64,
}

impl Default for SecAggConfig {
    fn default() -> Self {
        Self {
            degree: degree(),
            threshold: threshold(),
            dropout_tolerance: tolerance(),
            bits: bits(),
            clip: clip(),
            sample_cap: sample_cap(),
            phase_timeout_secs: phase_timeout(),
        }
    }
}

impl SecAggConfig {
    /// The setup of one secure round for `cohort` (sorted) summing vectors of `vector_len`.
    /// The scale is the largest that cannot wrap the modulus, halved for rounding headroom.
    pub fn setup(&self, round: u64, cohort: Vec<String>, graph_seed: u64, vector_len: usize) -> SecAggSetup {
        let n = cohort.len().max(1) as f64;
        let scale = ((crypto::modulus_mask(self.bits) as f64) / (n * 2.0 * self.clip) / 2.0).floor().max(1.0);
        SecAggSetup {
            round,
            params: SecAggParams {
                threshold: self.threshold,
                degree: self.degree,
                dropout_tolerance: self.dropout_tolerance,
                quantizer: Quantizer { bits: self.bits, clip: self.clip, scale },
            },
            cohort,
            graph_seed,
            vector_len,
        }
    }
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
    pub secagg: SecAggConfig,
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
        if self.collection == Collection::Secure {
            let s = &self.secagg;
            if !(s.phase_timeout_secs.is_finite() && s.phase_timeout_secs > 0.0) || s.sample_cap == 0 {
                return Err("federation.secagg: phase_timeout_secs and sample_cap must be positive".into());
            }
            let cohort = (0..self.clients_per_round).map(|i| format!("{i:08}")).collect();
            s.setup(0, cohort, 0, 1)
                .check()
                .map_err(|e| format!("federation.secagg (with clients_per_round = {}): {e}", self.clients_per_round))?;
        }
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

//! Scenario files: a whole simulated federation in one TOML document.
//!
//! ```toml
//! name = "quickstart"
//! model = "mnist-2nn"          # a bundled spec, or a path to a spec file
//! clients = 10
//! [data]
//! dataset = "mnist"
//! train_examples = 12000       # optional: the first N training examples
//! [partition]
//! kind = "iid"                 # or shards / dirichlet
//! [federation]                 # the same table as in server.toml
//! rounds = 5
//! clients_per_round = 10
//! ```

use std::path::{Path, PathBuf};

use cohort_common::data::Partition;
use cohort_common::model::ModelSpec;
use cohort_server::config::Federation;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn mnist() -> String {
    "mnist".into()
}
fn ten() -> usize {
    10
}
fn cpu() -> String {
    "cpu".into()
}

/// Which data set, and how much of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataChoice {
    /// A bundled data set, `mnist`, or `synthetic`: no training, clients answer with random
    /// updates (to benchmark the protocol alone).
    #[serde(default = "mnist")]
    pub dataset: String,
    /// Examples each client claims with `synthetic` (its FedAvg weight).
    #[serde(default = "ten")]
    pub synthetic_examples: usize,
    /// Use only the first N training examples (quick runs).
    #[serde(default)]
    pub train_examples: Option<usize>,
    /// Use only the first N test examples.
    #[serde(default)]
    pub test_examples: Option<usize>,
}

impl Default for DataChoice {
    fn default() -> Self {
        Self { dataset: mnist(), synthetic_examples: ten(), train_examples: None, test_examples: None }
    }
}

/// Simulated crashes: in every round, this fraction of the cohort (rounded down) crashes, each
/// at a random step of the round (after its update, or after any secure-aggregation message),
/// and reconnects for later rounds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    #[serde(default)]
    pub dropout_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `mnist-2nn`, `mnist-cnn`, or a path to a model spec (relative to the scenario file).
    pub model: String,
    /// Number of simulated clients.
    pub clients: usize,
    #[serde(default)]
    pub data: DataChoice,
    pub partition: Partition,
    pub federation: Federation,
    /// Device the simulated clients train on: `auto`, `cpu` or `cuda:N`.
    #[serde(default = "cpu")]
    pub device: String,
    /// Test accuracy the report marks as reached (first round at or above it).
    #[serde(default)]
    pub target_accuracy: Option<f64>,
    /// Simulated crashes.
    #[serde(default)]
    pub faults: Faults,
    /// Where the scenario was read from (for relative paths); not part of the file.
    #[serde(skip)]
    pub origin: PathBuf,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self, ScenarioError> {
        let bad = |message: String| ScenarioError::Invalid { path: origin.display().to_string(), message };
        let mut s: Scenario = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        s.origin = origin.to_path_buf();
        if s.clients == 0 {
            return Err(bad("clients must be at least 1".into()));
        }
        if s.federation.clients_per_round > s.clients {
            return Err(bad(format!(
                "federation.clients_per_round = {} is more than the {} clients",
                s.federation.clients_per_round, s.clients
            )));
        }
        s.federation.check().map_err(bad)?;
        if !(0.0..1.0).contains(&s.faults.dropout_fraction) {
            return Err(bad(format!("faults.dropout_fraction = {} must be in [0, 1)", s.faults.dropout_fraction)));
        }
        if s.data.dataset != "mnist" && s.data.dataset != "synthetic" {
            return Err(bad(format!("data.dataset = `{}`: use mnist or synthetic", s.data.dataset)));
        }
        s.model_spec()?;
        Ok(s)
    }

    /// The model spec the scenario names.
    pub fn model_spec(&self) -> Result<ModelSpec, ScenarioError> {
        let bad = |message: String| ScenarioError::Invalid { path: self.origin.display().to_string(), message };
        let text = match self.model.as_str() {
            "mnist-2nn" => cohort_common::specs::MNIST_2NN.to_string(),
            "mnist-cnn" => cohort_common::specs::MNIST_CNN.to_string(),
            path => {
                let p = self.origin.parent().unwrap_or(Path::new(".")).join(path);
                std::fs::read_to_string(&p).map_err(|e| {
                    bad(format!(
                        "model = `{path}`: not a bundled model (mnist-2nn, mnist-cnn) and {}: {e}",
                        p.display()
                    ))
                })?
            }
        };
        ModelSpec::from_toml(&text).map_err(|e| bad(format!("model `{}`: {e}", self.model)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") && path.file_name().unwrap() != "Cargo.toml" {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 4, "found {n} scenarios");
    }

    #[test]
    fn wrong_scenarios_name_the_field() {
        let p = Path::new("bad.toml");
        let base = "name='x'\nmodel='mnist-2nn'\nclients=5\n[partition]\nkind='iid'\n[federation]\nrounds=1\nclients_per_round=5\ncollection='plain'\n";
        assert!(Scenario::parse(base, p).is_ok());
        let err = Scenario::parse(&base.replace("clients=5", "clients=2"), p).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("clients_per_round"), "{err}");
        let err = Scenario::parse(&base.replace("'iid'", "'iidd'"), p).unwrap_err().to_string();
        assert!(err.contains("iidd"), "{err}");
        let err = Scenario::parse(&base.replace("mnist-2nn", "mnist-3nn"), p).unwrap_err().to_string();
        assert!(err.contains("mnist-3nn"), "{err}");
        // Secure aggregation's defaults (degree 8, threshold 5) cannot serve a cohort of 5.
        let err =
            Scenario::parse(&base.replace("collection='plain'", "collection='secure'"), p).unwrap_err().to_string();
        assert!(err.contains("federation.secagg") && err.contains("threshold"), "{err}");
        let err = Scenario::parse(&base.replace("mnist-2nn", "mnist-3nn"), p).unwrap_err().to_string();
        assert!(err.contains("mnist-3nn"), "{err}");
    }
}

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
    /// A bundled data set, `mnist` or `winequality` (red; quality 3..8 as classes 0..5), or
    /// `synthetic`: no training, clients answer with random updates (to benchmark the protocol
    /// alone).
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
    /// Data sets without a test split (`winequality`): the fraction of each class held out as
    /// the server's test set (stratified, seeded).
    #[serde(default = "fifth")]
    pub test_fraction: f64,
    /// Make the training set long-tailed: class c keeps `n_0 * ratio^(-c / (K - 1))` of its
    /// examples (Cao et al. 2019's protocol; the imbalance ratio is largest / smallest class).
    /// The test set stays as it is.
    #[serde(default)]
    pub longtail_ratio: Option<f64>,
    /// Each client holds out this fraction of its examples for federated evaluation
    /// (`federation.evaluate_every`); 0 evaluates on the training data.
    #[serde(default)]
    pub validation_fraction: f64,
}

fn fifth() -> f64 {
    0.2
}

impl Default for DataChoice {
    fn default() -> Self {
        Self {
            dataset: mnist(),
            synthetic_examples: ten(),
            train_examples: None,
            test_examples: None,
            test_fraction: fifth(),
            longtail_ratio: None,
            validation_fraction: 0.0,
        }
    }
}

/// Which clients label which head of a multi-task model. The scenario's clients are dealt to
/// the tasks in order (the first `clients` to the first task, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskChoice {
    pub head: String,
    pub clients: usize,
    /// Labelled examples per client: the first of its partition (default: all of it).
    #[serde(default)]
    pub examples_per_client: Option<usize>,
    /// `map[label]`: the data set's labels mapped to this head's classes (default: as they are).
    #[serde(default)]
    pub map: Option<Vec<u32>>,
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
    /// Multi-task: which clients label which head (default: every client the first head).
    #[serde(default)]
    pub tasks: Vec<TaskChoice>,
    /// Where the scenario was read from (for relative paths); not part of the file.
    #[serde(skip)]
    pub origin: PathBuf,
    /// A scenario compiled into the binary ([`crate::bundled`]): the model specs it names are
    /// the bundled ones, not files.
    #[serde(skip)]
    pub bundled: bool,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self, ScenarioError> {
        Self::parse_with(text, origin, &[])
    }

    /// Reads a scenario file with `KEY=VALUE` overrides (`federation.train.loss.weighting=
    /// inverse_frequency`): VALUE is a TOML value, or a string when it does not parse as one.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Io { path: path.display().to_string(), source })?;
        Self::parse_with(&text, path, overrides)
    }

    /// `cohort-sim run FILE`: the scenario file FILE with `overrides`, or, when there is no such
    /// file, the bundled scenario that FILE names (`quickstart`, `quickstart.toml` or
    /// `scenarios/quickstart.toml`), so that an installed binary runs them without the source
    /// tree. The second value says which bundled scenario stood in for a missing file.
    pub fn open(file: &Path, overrides: &[String]) -> Result<(Self, Option<&'static str>), ScenarioError> {
        if file.exists() {
            return Ok((Self::load_with(file, overrides)?, None));
        }
        let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let Some((name, text)) = crate::bundled::SCENARIOS.iter().find(|(n, _)| *n == stem) else {
            return Err(ScenarioError::Invalid {
                path: file.display().to_string(),
                message: format!(
                    "no such file, and not the name of a bundled scenario ({}; `cohort-sim scenarios` lists them)",
                    crate::bundled::scenario_names()
                ),
            });
        };
        let mut s = Self::parse_bundled(text, name, overrides)?;
        s.bundled = true;
        Ok((s, Some(name)))
    }

    /// Parses bundled scenario `name` (its text from [`crate::bundled::SCENARIOS`]).
    pub fn parse_bundled(text: &str, name: &str, overrides: &[String]) -> Result<Self, ScenarioError> {
        Self::parse_inner(text, &Path::new("<bundled>").join(format!("{name}.toml")), overrides, true)
    }

    pub fn parse_with(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, ScenarioError> {
        Self::parse_inner(text, origin, overrides, false)
    }

    fn parse_inner(text: &str, origin: &Path, overrides: &[String], bundled: bool) -> Result<Self, ScenarioError> {
        let bad = |message: String| ScenarioError::Invalid { path: origin.display().to_string(), message };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        for assignment in overrides {
            set_dotted(&mut doc, assignment).map_err(|e| bad(format!("--set {assignment}: {e}")))?;
        }
        let mut s: Scenario = doc.try_into().map_err(|e: toml::de::Error| bad(e.to_string()))?;
        s.origin = origin.to_path_buf();
        s.bundled = bundled;
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
        if !["mnist", "winequality", "synthetic"].contains(&s.data.dataset.as_str()) {
            return Err(bad(format!("data.dataset = `{}`: use mnist, winequality or synthetic", s.data.dataset)));
        }
        if !(s.data.test_fraction > 0.0 && s.data.test_fraction < 1.0) {
            return Err(bad(format!("data.test_fraction = {} must be between 0 and 1", s.data.test_fraction)));
        }
        if !(0.0..0.5).contains(&s.data.validation_fraction) {
            return Err(bad(format!("data.validation_fraction = {} must be in [0, 0.5)", s.data.validation_fraction)));
        }
        if let Some(r) = s.data.longtail_ratio.filter(|r| !(r.is_finite() && *r >= 1.0)) {
            return Err(bad(format!("data.longtail_ratio = {r} must be at least 1")));
        }
        let spec = s.model_spec()?;
        s.federation.check_model(&spec).map_err(bad)?;
        if !s.tasks.is_empty() {
            let dealt: usize = s.tasks.iter().map(|t| t.clients).sum();
            if dealt != s.clients {
                return Err(bad(format!("tasks deal {dealt} clients; the scenario has {}", s.clients)));
            }
            for t in &s.tasks {
                let head = spec
                    .heads
                    .iter()
                    .find(|h| h.name == t.head)
                    .ok_or_else(|| bad(format!("tasks: head `{}` is not in the model `{}`", t.head, spec.name)))?;
                if let Some(m) = t.map.as_ref().filter(|m| m.iter().any(|&c| c as usize >= head.classes)) {
                    return Err(bad(format!(
                        "tasks: the map {m:?} of head `{}` exceeds its {} classes",
                        t.head, head.classes
                    )));
                }
            }
        }
        Ok(s)
    }

    /// The model spec the scenario names.
    pub fn model_spec(&self) -> Result<ModelSpec, ScenarioError> {
        let bad = |message: String| ScenarioError::Invalid { path: self.origin.display().to_string(), message };
        ModelSpec::from_toml(&self.model_spec_text()?).map_err(|e| bad(format!("model `{}`: {e}", self.model)))
    }

    /// The text of the model spec the scenario names (a bundled spec, or the file's).
    pub fn model_spec_text(&self) -> Result<String, ScenarioError> {
        let bad = |message: String| ScenarioError::Invalid { path: self.origin.display().to_string(), message };
        Ok(match self.model.as_str() {
            "mnist-2nn" => cohort_common::specs::MNIST_2NN.to_string(),
            "mnist-cnn" => cohort_common::specs::MNIST_CNN.to_string(),
            path if self.bundled => crate::bundled::model(path)
                .ok_or_else(|| bad(format!("model = `{path}`: not a bundled model spec")))?
                .to_string(),
            path => {
                let p = self.origin.parent().unwrap_or(Path::new(".")).join(path);
                std::fs::read_to_string(&p).map_err(|e| {
                    bad(format!(
                        "model = `{path}`: not a bundled model (mnist-2nn, mnist-cnn) and {}: {e}",
                        p.display()
                    ))
                })?
            }
        })
    }
}

/// Sets `a.b.c = value` in a TOML table, creating tables on the way.
fn set_dotted(doc: &mut toml::Table, assignment: &str) -> Result<(), String> {
    let (key, value) = assignment.split_once('=').ok_or("expected KEY=VALUE")?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.trim().to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, path) = parts.split_last().ok_or("empty key")?;
    let mut table = doc;
    for part in path {
        table = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_nested_keys() {
        let p = Path::new("x.toml");
        let base = "name='x'\nmodel='mnist-2nn'\nclients=5\n[partition]\nkind='iid'\n[federation]\nrounds=1\nclients_per_round=5\ncollection='plain'\n";
        let set = |o: &[&str]| Scenario::parse_with(base, p, &o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let s = set(&["federation.rounds=7", "federation.train.loss.weighting=inverse_frequency"]).unwrap();
        assert_eq!(s.federation.rounds, 7);
        assert_eq!(s.federation.train.loss.weighting, cohort_common::train::ClassWeighting::InverseFrequency);
        let err = set(&["federation.train.loss.weighting=sometimes"]).unwrap_err().to_string();
        assert!(err.contains("sometimes"), "{err}");
        assert!(set(&["name.first=1"]).unwrap_err().to_string().contains("not a table"));
    }

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
        // The same, compiled in: no file is read for them or the model specs they name.
        for (name, text) in crate::bundled::SCENARIOS {
            let s = Scenario::parse_bundled(text, name, &[]).unwrap_or_else(|e| panic!("{e}"));
            assert!(s.bundled && s.model_spec().is_ok(), "{name}");
        }
        let (s, stood_in) = Scenario::open(Path::new("/nowhere/scenarios/winequality.toml"), &[]).unwrap();
        assert_eq!((s.name.as_str(), stood_in), ("winequality", Some("winequality")));
        let err = Scenario::open(Path::new("/nowhere/quick.toml"), &[]).unwrap_err().to_string();
        assert!(err.contains("/nowhere/quick.toml") && err.contains("quickstart"), "{err}");
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
        // Secure aggregation's defaults fit a cohort of 5 (threshold and tolerance are derived);
        // a threshold written for degree 8 does not.
        let secure = base.replace("collection='plain'", "collection='secure'");
        assert!(Scenario::parse(&secure, p).is_ok());
        let err =
            Scenario::parse(&format!("{secure}\n[federation.secagg]\nthreshold = 5\n"), p).unwrap_err().to_string();
        assert!(err.contains("federation.secagg") && err.contains("threshold"), "{err}");
        let err = Scenario::parse(&base.replace("mnist-2nn", "mnist-3nn"), p).unwrap_err().to_string();
        assert!(err.contains("mnist-3nn"), "{err}");
    }
}

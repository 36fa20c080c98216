//! `server.toml`: where to listen, which model, the test set, and the federation's rounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cohort_common::dp::{AdaptiveClip, DpPlan};
use cohort_common::model::ModelSpec;
use cohort_common::secagg::quantize::Quantizer;
use cohort_common::secagg::{crypto, SecAggParams, SecAggSetup, MAX_COHORT};
use cohort_common::strategy::StrategyConfig;
use cohort_common::train::{CountScope, TrainConfig};
use cohort_io::files::{DataSource, FileError};
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
    /// Each coordinate of a weighted update is clipped to [-clip, clip] before quantization
    /// (with `[federation.dp]`, the range comes from the DP clip and noise instead).
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
    /// The setup of one secure round for `cohort` (sorted) summing vectors of `vector_len` whose
    /// coordinates lie in `[-range, range]`. The scale is the largest that cannot wrap the
    /// modulus, halved for rounding headroom.
    pub fn setup(&self, round: u64, cohort: Vec<String>, vector_len: usize, range: f64) -> SecAggSetup {
        let n = cohort.len().max(1) as f64;
        let scale = ((crypto::modulus_mask(self.bits) as f64) / (n * 2.0 * range) / 2.0).floor().max(1.0);
        SecAggSetup {
            round,
            params: SecAggParams {
                threshold: self.threshold,
                degree: self.degree,
                dropout_tolerance: self.dropout_tolerance,
                quantizer: Quantizer { bits: self.bits, clip: range, scale, wrap: false },
            },
            purpose: String::new(),
            cohort,
            vector_len,
            min_inputs: 1,
        }
    }
}

fn delta() -> f64 {
    1e-5
}
fn target_quantile() -> f64 {
    0.5
}
fn clip_learning_rate() -> f64 {
    0.2
}

/// `[federation.dp.adaptive]`: adaptive clipping (Andrew et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipConfig {
    /// The quantile of update norms the clip norm tracks.
    #[serde(default = "target_quantile")]
    pub target_quantile: f64,
    /// eta in C <- C exp(-eta (b - target_quantile)).
    #[serde(default = "clip_learning_rate")]
    pub learning_rate: f64,
}

impl Default for AdaptiveClipConfig {
    fn default() -> Self {
        Self { target_quantile: target_quantile(), learning_rate: clip_learning_rate() }
    }
}

/// `[federation.dp]`: clipping and user-level differential privacy (needs secure collection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// L2 bound on each client's update (the initial one with adaptive clipping).
    pub clip: f64,
    /// z: the sum of a round carries Gaussian noise of standard deviation z * clip. 0 clips
    /// without noise and makes no privacy claim.
    #[serde(default)]
    pub noise_multiplier: f64,
    /// Clip the trunk and each head separately (bounds clip * sqrt(len / total)).
    #[serde(default)]
    pub per_segment: bool,
    #[serde(default = "delta")]
    pub delta: f64,
    /// Stop before a round that would take epsilon past this.
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
    /// Noise on the count of unclipped updates (default max(clients_per_round / 20, z)).
    #[serde(default)]
    pub count_noise: Option<f64>,
    #[serde(default)]
    pub adaptive: Option<AdaptiveClipConfig>,
}

impl DpConfig {
    pub fn count_noise(&self, clients_per_round: usize) -> f64 {
        self.count_noise.unwrap_or((clients_per_round as f64 / 20.0).max(self.noise_multiplier))
    }

    /// The plan of one round with clip norm `clip`, noise divisor `min_survivors`, sampling
    /// rate `q` and `expected_clients` (what every sum is divided by).
    pub fn plan(
        &self,
        clip: f64,
        clients_per_round: usize,
        min_survivors: usize,
        q: f64,
        expected_clients: f64,
    ) -> DpPlan {
        DpPlan {
            clip,
            per_segment: self.per_segment,
            noise_multiplier: self.noise_multiplier,
            count_noise: self.count_noise(clients_per_round),
            min_survivors,
            sampling_rate: q,
            expected_clients: expected_clients.max(1.0),
        }
    }

    /// The clip norm after a round in which a noisy fraction `unclipped` of the updates were at
    /// most `clip`.
    pub fn next_clip(&self, clip: f64, unclipped: f64) -> f64 {
        match &self.adaptive {
            Some(a) => {
                AdaptiveClip { clip, eta: a.learning_rate, target_quantile: a.target_quantile }.update(unclipped)
            }
            None => clip,
        }
    }

    fn check(&self, fed: &Federation) -> Result<(), String> {
        if fed.collection != Collection::Secure {
            return Err("federation.dp needs collection = \"secure\": each client adds only a share of the noise, \
                        so only the sum is private"
                .into());
        }
        self.plan(self.clip, fed.clients_per_round, fed.min_clients, 1.0, fed.clients_per_round as f64)
            .check()
            .map_err(|e| e.to_string())?;
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "delta = {} must be between 0 and 1 (typically below 1 / enrolled clients)",
                self.delta
            ));
        }
        if let Some(budget) = self.epsilon_budget {
            if !(budget.is_finite() && budget > 0.0) {
                return Err(format!("epsilon_budget = {budget} must be a positive number"));
            }
            if self.noise_multiplier == 0.0 {
                return Err("epsilon_budget needs noise_multiplier > 0: without noise epsilon is infinite".into());
            }
        }
        if let Some(a) = &self.adaptive {
            if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                return Err(format!("adaptive.target_quantile = {} must be between 0 and 1", a.target_quantile));
            }
            if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) {
                return Err(format!("adaptive.learning_rate = {} must be positive", a.learning_rate));
            }
        }
        Ok(())
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
    /// Clipping and differential privacy; off when absent.
    #[serde(default)]
    pub dp: Option<DpConfig>,
    /// Federated evaluation after every this many rounds: the round's participants evaluate the
    /// new model on their own validation data and their confusion matrices are summed securely.
    #[serde(default)]
    pub evaluate_every: Option<u64>,
}

impl Federation {
    /// Checks the values together; the message names the field.
    /// The checks that need the model: every head named in the config exists.
    pub fn check_model(&self, spec: &ModelSpec) -> Result<(), String> {
        self.train.check_heads(spec).map_err(|e| format!("federation.train: {e}"))
    }

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
            // Checked before the trial cohort below is built: one id per client.
            if self.clients_per_round > MAX_COHORT {
                return Err(format!(
                    "federation.clients_per_round = {} is more than a secure session takes ({MAX_COHORT} clients)",
                    self.clients_per_round
                ));
            }
            let cohort = (0..self.clients_per_round).map(|i| format!("{i:08}")).collect();
            s.setup(0, cohort, 1, s.clip)
                .check()
                .map_err(|e| format!("federation.secagg (with clients_per_round = {}): {e}", self.clients_per_round))?;
        }
        self.strategy.build(0).map_err(|e| format!("federation.strategy: {e}"))?;
        if let Some(dp) = &self.dp {
            dp.check(self).map_err(|e| format!("federation.dp: {e}"))?;
        }
        if let Some(every) = self.evaluate_every {
            if every == 0 || self.collection != Collection::Secure {
                return Err(format!(
                    "federation.evaluate_every = {every} must be at least 1, with collection = \"secure\" (a \
                     client's confusion matrix reveals its labels, so only sums may leave it)"
                ));
            }
            if self.dp.is_some() {
                return Err("federation.evaluate_every cannot be used with federation.dp: the confusion sums are \
                            not differentially private"
                    .into());
            }
        }
        let global = std::iter::once(("loss".to_string(), &self.train.loss))
            .chain(self.train.head_loss.iter().map(|(head, loss)| (format!("head_loss.{head}"), loss)))
            .find(|(_, loss)| loss.scope == CountScope::Global);
        if let Some((place, _)) = global {
            if self.collection != Collection::Secure {
                return Err(format!(
                    "federation.train.{place}.scope = \"global\" sums the clients' label counts, which only \
                     secure aggregation may do: set collection = \"secure\""
                ));
            }
            if self.dp.is_some() {
                return Err(format!(
                    "federation.train.{place}.scope = \"global\" cannot be used with federation.dp: the label \
                     census is not differentially private and its cost is not accounted"
                ));
            }
        }
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
    /// Serve Prometheus metrics here (`GET /metrics`).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub federation: Federation,
}

/// `server.toml` read, checked and with its files loaded.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub spec: ModelSpec,
    pub test_data: Option<DataSource>,
    pub metrics_listen: Option<SocketAddr>,
    pub federation: Federation,
}

impl ServerConfigFile {
    /// Parses the text of `server.toml` and checks its federation: everything `load` does but
    /// reading the files (this one and the model spec it names). The error names the field.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: ServerConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.federation.check()?;
        Ok(file)
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| FileError::Io { path: path.display().to_string(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let bad = |message: String| FileError::Config { path: path.display().to_string(), message };
        let file = ServerConfigFile::from_toml(&text).map_err(bad)?;
        let model_path = base.join(&file.model);
        let text = std::fs::read_to_string(&model_path)
            .map_err(|source| FileError::Io { path: model_path.display().to_string(), source })?;
        let spec = ModelSpec::from_toml(&text)
            .map_err(|e| FileError::Config { path: model_path.display().to_string(), message: e.to_string() })?;
        file.federation.check_model(&spec).map_err(bad)?;
        Ok(Self {
            listen: file.listen,
            spec,
            test_data: file.test_data.map(|d| d.resolve(base)),
            metrics_listen: file.metrics_listen,
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
        for (dp, field) in [
            ("collection = 'plain'\n[federation.dp]\nclip = 1.0", "collection = \"secure\""),
            ("[federation.dp]\nclip = 0.0", "clip = 0"),
            ("[federation.dp]\nclip = 1.0\nepsilon_budget = 8.0", "noise_multiplier > 0"),
            ("[federation.dp]\nclip = 1.0\nnoise_multiplier = 1.0\ncount_noise = 0.1", "count_noise = 0.1"),
            ("[federation.dp]\nclip = 1.0\n[federation.dp.adaptive]\ntarget_quantile = 2.0", "target_quantile"),
        ] {
            std::fs::write(&path, format!("model = 'm.toml'\n[federation]\nrounds = 3\n{dp}\n")).unwrap();
            let err = ServerConfig::load(&path).err().unwrap().to_string();
            assert!(err.contains("federation.dp") && err.contains(field), "{dp}: {err}");
        }
        std::fs::write(
            &path,
            "model = 'm.toml'\n[federation]\nrounds = 3\n[federation.dp]\nclip = 1.0\nnoise_multiplier = 1.0\n",
        )
        .unwrap();
        let dp = ServerConfig::load(&path).unwrap().federation.dp.unwrap();
        assert_eq!(dp.count_noise(10), 1.0, "small cohorts default to count noise z");
        assert_eq!(dp.count_noise(600), 30.0, "Andrew et al.: clients_per_round / 20");
        for (train, field) in [
            ("[federation.train.head_loss.digit]\nscope = 'global'", "federation.train.head_loss.digit.scope"),
            ("[federation.train.head_loss.colour]\nweighting = 'inverse_frequency'", "no head `colour`"),
            ("[federation.train.head_loss.digit]\nbeta = 2.0", "head_loss.digit.beta = 2"),
            ("[federation.train]\nhead_epochs = 0", "head_epochs = 0"),
        ] {
            std::fs::write(
                &path,
                format!("model = 'm.toml'\n[federation]\nrounds = 3\ncollection = 'plain'\n{train}\n"),
            )
            .unwrap();
            let err = ServerConfig::load(&path).err().unwrap().to_string();
            assert!(err.contains("server.toml") && err.contains(field), "{train}: {err}");
        }
    }

    #[test]
    fn a_huge_secure_cohort_is_an_error_not_an_allocation() {
        // Found in review, confirmed with the `server_config_toml` target: the check built a
        // trial cohort of clients_per_round ids before asking whether a secure session takes that
        // many (3.2 TB for this one).
        let text = "model = 'm.toml'\n[federation]\nrounds = 1\nclients_per_round = 100000000000\n";
        let err = ServerConfigFile::from_toml(text).err().unwrap();
        assert!(err.contains("clients_per_round = 100000000000 is more than a secure session takes"), "{err}");
        let plain =
            "model = 'm.toml'\n[federation]\nrounds = 1\nclients_per_round = 100000000000\ncollection = 'plain'\n";
        assert!(ServerConfigFile::from_toml(plain).is_ok());
    }

    #[test]
    fn adaptive_clipping_follows_the_noisy_count() {
        let mut dp = DpConfig {
            clip: 1.0,
            noise_multiplier: 1.0,
            per_segment: false,
            delta: 1e-5,
            epsilon_budget: None,
            count_noise: None,
            adaptive: None,
        };
        assert_eq!(dp.next_clip(1.0, 0.0), 1.0, "fixed clipping stays put");
        dp.adaptive = Some(AdaptiveClipConfig::default());
        assert!(dp.next_clip(1.0, 0.0) > 1.0, "every update clipped: C grows");
        assert!(dp.next_clip(1.0, 1.0) < 1.0, "none clipped: C shrinks");
    }
}

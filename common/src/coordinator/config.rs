//! The `[federation]` table (of `server.toml` and of scenarios): rounds, cohorts, collection,
//! secure aggregation, differential privacy, the training terms, the server optimizer, and how
//! the coordinator treats sites that fail. Everything here is a protocol setting the
//! [`super::Coordinator`] acts on; where to listen and which files to read stay in the server.

use crate::dp::{AdaptiveClip, DpPlan};
use crate::model::ModelSpec;
use crate::secagg::quantize::Quantizer;
use crate::secagg::{crypto, SecAggParams, SecAggSetup, MAX_COHORT};
use crate::strategy::StrategyConfig;
use crate::train::{CountScope, TrainConfig};
use serde::{Deserialize, Serialize};
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
    /// Shares needed to rebuild a secret (t): more than k / 2. Absent: derived from the
    /// neighbourhood each cohort gets (5 of 8 neighbours; more than half of fewer).
    #[serde(default)]
    pub threshold: Option<usize>,
    /// Fraction of a neighbourhood that may drop with the sum still exact. Absent: 0.3, or less
    /// where a small neighbourhood leaves less (0 for two or three sites).
    #[serde(default)]
    pub dropout_tolerance: Option<f64>,
    /// Accept secure sums of two updates (two sites per round, or a round where only two
    /// remain): each of the two then learns the other's update from the sum. Without it, a
    /// federation of two sites per round is refused and a secure sum needs three inputs.
    #[serde(default)]
    pub allow_two_site_sums: bool,
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
            threshold: None,
            dropout_tolerance: None,
            allow_two_site_sums: false,
            bits: bits(),
            clip: clip(),
            sample_cap: sample_cap(),
            phase_timeout_secs: phase_timeout(),
        }
    }
}

impl SecAggConfig {
    /// The settings as written (the quantizer is per round).
    #[cfg(test)]
    fn params(&self) -> SecAggParams {
        SecAggParams {
            threshold: self.threshold.unwrap_or(self.degree / 2 + 1),
            degree: self.degree,
            dropout_tolerance: self.dropout_tolerance.unwrap_or(tolerance()),
            quantizer: Quantizer { bits: self.bits, clip: 1.0, scale: 1.0, wrap: false },
        }
    }

    /// The setup of one secure round for `cohort` (sorted) summing vectors of `vector_len` whose
    /// coordinates lie in `[-range, range]`. The scale is the largest that cannot wrap the
    /// modulus, halved for rounding headroom.
    ///
    /// A cohort that does not fit the configured degree (smaller than `degree + 1`: a site
    /// offline, a Poisson sample) gets the largest degree k that fits it (one less when k would
    /// be odd with an odd cohort, which no graph has), and the threshold `min(threshold, k)`, but
    /// never k / 2 or less (the bound the secret sharing's security needs: the shares the server
    /// can collect for one client never reach it for both of its secrets). The dropout tolerance
    /// comes down instead, to what that threshold leaves: collusion resistance is kept before
    /// robustness.
    pub fn setup(&self, round: u64, cohort: Vec<String>, vector_len: usize, range: f64) -> SecAggSetup {
        let n = cohort.len().max(1) as f64;
        let scale = ((crypto::modulus_mask(self.bits) as f64) / (n * 2.0 * range) / 2.0).floor().max(1.0);
        let size = cohort.len();
        let mut k = self.degree.min(size.saturating_sub(1));
        if k % 2 == 1 && size % 2 == 1 && k + 1 != size {
            k -= 1;
        }
        // What the file gives is kept for the configured degree (the check says if it cannot
        // hold); what it leaves out, and everything for a smaller neighbourhood, is derived.
        let as_written = k == self.degree;
        // Derived: the least threshold the secret sharing's security allows (more than half the
        // neighbourhood: 5 of 8), which leaves the most room for dropouts.
        let threshold = match self.threshold {
            Some(t) if as_written => t,
            Some(t) => t.min(k).max(k / 2 + 1),
            None => k / 2 + 1,
        };
        // floor(k (1 - tolerance)) must stay at least the threshold.
        let allowed = (k.saturating_sub(threshold)) as f64 / k.max(1) as f64;
        let dropout_tolerance = match self.dropout_tolerance {
            Some(d) if as_written => d,
            d => d.unwrap_or(tolerance()).min((allowed - 1e-9).max(0.0)),
        };
        let degree = k;
        SecAggSetup {
            round,
            params: SecAggParams {
                threshold,
                degree,
                dropout_tolerance,
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
    /// Aborted rounds do not count toward `rounds`; this many aborted in a row stop the server,
    /// saying why the last one aborted.
    #[serde(default = "max_consecutive_aborts")]
    pub max_consecutive_aborts: u64,
    /// How sites that decline or fail round after round are left out for a while.
    #[serde(default)]
    pub backoff: SiteBackoff,
}

fn max_consecutive_aborts() -> u64 {
    5
}
fn after_failures() -> u32 {
    2
}
fn backoff_initial() -> f64 {
    30.0
}
fn backoff_max() -> f64 {
    1800.0
}

/// `[federation.backoff]`: a site that declines or fails `after_failures` sessions in a row (a
/// round, a label census or an evaluation; being offline when sampled does not count) is not
/// sampled for `initial_secs`, doubling with each further failure up to `max_secs`. One session
/// it completes clears its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteBackoff {
    #[serde(default = "after_failures")]
    pub after_failures: u32,
    #[serde(default = "backoff_initial")]
    pub initial_secs: f64,
    #[serde(default = "backoff_max")]
    pub max_secs: f64,
}

impl Default for SiteBackoff {
    fn default() -> Self {
        Self { after_failures: after_failures(), initial_secs: backoff_initial(), max_secs: backoff_max() }
    }
}

impl SiteBackoff {
    /// How long a site with `failures` failures in a row is left out (zero: it is not).
    pub fn exclusion(&self, failures: u32) -> std::time::Duration {
        if failures < self.after_failures.max(1) {
            return std::time::Duration::ZERO;
        }
        let doublings = (failures - self.after_failures.max(1)).min(30);
        let secs = (self.initial_secs * f64::from(1u32 << doublings)).min(self.max_secs);
        std::time::Duration::from_secs_f64(secs.max(0.0))
    }
}

impl Federation {
    /// The fewest updates a secure training sum may hold: three, unless the operator accepted
    /// sums of two (`allow_two_site_sums`), where each of the two learns the other's update.
    pub fn min_secure_sum(&self) -> usize {
        match self.secagg.allow_two_site_sums {
            true => crate::secagg::MIN_TRAIN_INPUTS,
            false => crate::secagg::MIN_TRAIN_INPUTS + 1,
        }
    }

    /// A warning for secure federations whose sum reveals a member's update: with two sites in a
    /// cohort, each learns the other's update by subtracting its own from the sum.
    pub fn small_cohort_warning(&self) -> Option<String> {
        (self.collection == Collection::Secure && self.clients_per_round <= 2).then(|| {
            format!(
                "federation.clients_per_round = {}: with two sites in a round, each learns the other's update from the \
                 sum (the sum minus its own); secure aggregation protects updates only from the server there. Use at \
                 least 3 sites per round, or accept this between the two data owners",
                self.clients_per_round
            )
        })
    }

    /// With differential privacy, a warning when the noise on each round's mean update is larger
    /// than the largest update itself: every client's update is clipped to L2 norm `clip`, and
    /// the mean carries Gaussian noise of norm about `z * clip * sqrt(params) / E` (E the expected
    /// clients per round). Past 1 the model mostly learns noise (DP-FedAvg needs large cohorts).
    pub fn noise_warning(&self, params: usize) -> Option<String> {
        let dp = self.dp.as_ref().filter(|dp| dp.noise_multiplier > 0.0)?;
        let expected = self.clients_per_round.max(1) as f64;
        let ratio = dp.noise_multiplier * (params as f64).sqrt() / expected;
        (ratio > 1.0).then(|| {
            let needed = (dp.noise_multiplier * (params as f64).sqrt()).ceil();
            format!(
                "federation.dp: the noise on each round's mean update is about {ratio:.1} times the largest update \
                 (noise_multiplier {} over a model of {params} parameters, {} clients per round): the model will \
                 mostly learn noise. DP-FedAvg needs cohorts of about {needed:.0} clients or more for this model and \
                 noise, or a smaller noise_multiplier (with a smaller privacy guarantee)",
                dp.noise_multiplier, self.clients_per_round
            )
        })
    }

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
        if self.max_consecutive_aborts == 0 {
            return Err("federation.max_consecutive_aborts must be at least 1".into());
        }
        let b = &self.backoff;
        if !(b.initial_secs.is_finite() && b.initial_secs >= 0.0 && b.max_secs.is_finite() && b.max_secs >= 0.0)
            || b.max_secs > 1e7
        {
            return Err(format!(
                "federation.backoff: initial_secs = {} and max_secs = {} must be non-negative numbers of seconds",
                b.initial_secs, b.max_secs
            ));
        }
        if self.collection == Collection::Secure {
            let s = &self.secagg;
            // Below 1e7 s (four months), like the other timeouts: a huge value overflowed the
            // deadline arithmetic when round 1 started.
            if !(s.phase_timeout_secs.is_finite() && s.phase_timeout_secs > 0.0 && s.phase_timeout_secs < 1e7) {
                return Err(format!(
                    "federation.secagg.phase_timeout_secs = {} must be a positive number of seconds below 1e7",
                    s.phase_timeout_secs
                ));
            }
            if s.sample_cap == 0 {
                return Err("federation.secagg.sample_cap must be at least 1".into());
            }
            // Checked before the trial cohort below is built: one id per client.
            if self.clients_per_round > MAX_COHORT {
                return Err(format!(
                    "federation.clients_per_round = {} is more than a secure session takes ({MAX_COHORT} clients)",
                    self.clients_per_round
                ));
            }
            // The settings as written, for a full cohort: a threshold that the configured degree
            // cannot meet is the operator's mistake, even though smaller cohorts adapt it.
            let cohort = (0..self.clients_per_round).map(|i| format!("{i:08}")).collect();
            let mut setup = s.setup(0, cohort, 1, s.clip);
            if let Some(t) = s.threshold {
                setup.params.threshold = t;
            }
            if let Some(d) = s.dropout_tolerance {
                setup.params.dropout_tolerance = d;
            }
            let k = setup.effective_degree();
            setup.check().map_err(|e| match k < s.degree {
                // The configured degree does not fit the cohort: say so instead of quoting a
                // degree the file does not have.
                true => format!(
                    "federation.secagg: a cohort of clients_per_round = {} gives each client {k} neighbours (degree = \
                     {} needs cohorts of at least {}), and {e}; set threshold and dropout_tolerance for {k} \
                     neighbours (threshold more than half of them, dropout_tolerance = 0 for the smallest cohorts), \
                     or sample more clients per round",
                    self.clients_per_round,
                    s.degree,
                    s.degree + 1
                ),
                false => format!("federation.secagg (with clients_per_round = {}): {e}", self.clients_per_round),
            })?;
        }
        if self.collection == Collection::Secure && self.clients_per_round <= 2 && !self.secagg.allow_two_site_sums {
            return Err(format!(
                "federation.clients_per_round = {}: with two sites in a round, each learns the other's update from \
                 the sum (the sum minus its own), so secure aggregation protects updates only from the server. \
                 Sample at least 3 sites per round, or, if both data owners accept that, set \
                 federation.secagg.allow_two_site_sums = true",
                self.clients_per_round
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15: the README's DP example wrecked a small federation (loss 944, then NaN) without
    /// a word about the noise.
    #[test]
    fn noise_far_above_the_signal_is_warned_about() {
        let mut fed: Federation = toml::from_str("rounds = 3\nclients_per_round = 10\n").unwrap();
        assert_eq!(fed.noise_warning(199_210), None, "no DP, no warning");
        fed.dp = Some(DpConfig {
            clip: 1.0,
            noise_multiplier: 1.0,
            per_segment: false,
            delta: 1e-5,
            epsilon_budget: None,
            count_noise: None,
            adaptive: None,
        });
        let warning = fed.noise_warning(199_210).unwrap();
        assert!(warning.contains("44.6 times") && warning.contains("447 clients"), "{warning}");
        fed.clients_per_round = 1000;
        assert_eq!(fed.noise_warning(199_210), None, "a large cohort averages the noise down");
    }

    /// Issue 15: a 2-site federation was refused with "threshold = 5 must be more than half of
    /// the degree 1" while the file said degree 8; and nothing said that with two sites each
    /// learns the other's update.
    #[test]
    fn small_consortia_get_plain_words() {
        // Two sites: refused unless the operator accepts that each learns the other's update.
        let two: Federation = toml::from_str("rounds = 3\nclients_per_round = 2\n").unwrap();
        let err = two.check().unwrap_err();
        assert!(err.contains("each learns the other's update") && err.contains("allow_two_site_sums = true"), "{err}");
        // With consent, the defaults fit two sites: threshold and tolerance follow the cohort.
        let ok: Federation =
            toml::from_str("rounds = 3\nclients_per_round = 2\n[secagg]\nallow_two_site_sums = true\n").unwrap();
        assert_eq!(ok.check(), Ok(()));
        assert!(ok.small_cohort_warning().unwrap().contains("each learns the other's update"));
        // Three sites with every secure-aggregation default: no setting to write.
        let three: Federation = toml::from_str("rounds = 3\nclients_per_round = 3\n").unwrap();
        assert_eq!(three.check(), Ok(()));
        assert_eq!(three.small_cohort_warning(), None);
        let setup = three.secagg.setup(1, vec!["a".into(), "b".into(), "c".into()], 4, 1.0);
        assert_eq!((setup.params.degree, setup.params.threshold, setup.params.dropout_tolerance), (2, 2, 0.0));
        // What the operator writes is kept, and a threshold the cohort cannot meet is named.
        let written: Federation = toml::from_str(
            "rounds = 3\nclients_per_round = 2\n[secagg]\nallow_two_site_sums = true\nthreshold = 5\n\
             dropout_tolerance = 0.3\n",
        )
        .unwrap();
        let err = written.check().unwrap_err();
        assert!(err.contains("a cohort of clients_per_round = 2 gives each client 1 neighbours"), "{err}");
        assert!(err.contains("degree = 8 needs cohorts of at least 9"), "{err}");
    }

    /// Every cohort size a federation can meet (a site offline, a Poisson sample far above or
    /// below the configured size) gets a setup the secure session accepts, with a threshold
    /// above half the neighbourhood; a full cohort keeps the configured settings.
    #[test]
    fn every_cohort_size_gets_a_secure_setup_that_checks() {
        for (degree, threshold, dropout_tolerance) in [(8, 5, 0.3), (5, 3, 0.3), (4, 3, 0.25), (2, 2, 0.0), (9, 5, 0.4)]
        {
            let config = SecAggConfig {
                degree,
                threshold: Some(threshold),
                dropout_tolerance: Some(dropout_tolerance),
                ..SecAggConfig::default()
            };
            for n in 2..60 {
                let cohort: Vec<String> = (0..n).map(|i| format!("c{i:03}")).collect();
                let mut setup = config.setup(1, cohort, 10, 1.0);
                setup.min_inputs = 2;
                let k = setup.effective_degree();
                let odd_graph = degree % 2 == 1 && n % 2 == 1 && degree + 1 != n;
                assert!(setup.check().is_ok(), "degree {degree}, n {n}: {:?}", setup.check());
                if n > degree && !odd_graph {
                    assert_eq!(setup.params, SecAggParams { quantizer: setup.params.quantizer, ..config.params() });
                    continue;
                }
                assert!(
                    setup.params.threshold * 2 > k,
                    "degree {degree}, n {n}: t {} of k {k}",
                    setup.params.threshold
                );
                assert!(setup.params.threshold >= threshold.min(k), "the threshold only comes down to fit k");
            }
        }
    }
}

//! Differential privacy: clipping, calibrated Gaussian noise, adaptive clipping and the privacy
//! accountant (Rényi DP of the sampled Gaussian mechanism).
//!
//! - [`clip_l2`] / [`clip_segments`]: bound a client's influence by scaling its update to an L2
//!   norm of at most C (the whole update, or each segment with its own bound). Clipping always
//!   happens before quantization and masking.
//! - [`add_gaussian_noise`]: each client's share of the noise, drawn from a cryptographic RNG
//!   (floating-point samplers seeded predictably would let an observer subtract the noise).
//! - [`AdaptiveClip`]: Andrew et al. 2021, C <- C exp(-eta (b - gamma)), b the noised fraction
//!   of clients whose update norm was at most C.
//! - [`RdpAccountant`]: RDP of the Poisson-subsampled Gaussian mechanism at integer and
//!   fractional orders (Mirónov, Talwar, Zhang 2019), composed over rounds, converted to
//!   (epsilon, delta) with the tight conversion of Balle et al. 2020 (as TF Privacy does).
//! - [`DpPlan`]: what a secure round's plan tells each client ([`privatize`] applies it);
//!   [`mean_from_sum`] turns the unmasked sum into the mean update (the noised sum divided by the
//!   public expected number of clients, never by a count) and the noisy fraction of unclipped
//!   updates.
//! - [`too_few_probability`]: how likely a Poisson sample is to fall below the round's minimum,
//!   which the accountant adds to delta (a round skipped for too few clients depends on who
//!   was sampled).
//! - [`PrivacyLedger`]: a client's own account of what it has spent, kept across restarts and
//!   bound to the federations it took part in. By default it charges every round it trains in
//!   at the unamplified epsilon (what holds against the server, which knows the sample); only a
//!   data owner who trusts the server's sampler lets it count amplification by sampling.
//!
//! ## What the operator is promised
//!
//! User-level (epsilon, delta)-DP of the sequence of global models. Each figure names the
//! adversary it holds against:
//!
//! - *Against anyone who sees only the models* (the server's `epsilon`, amplified by sampling):
//!   each enrolled client is in a round's cohort independently with probability `q` (Poisson
//!   sampling from OS randomness; nothing a client receives lets it recompute a cohort), every
//!   round's sum carries Gaussian noise of standard deviation at least `z C` (each of at least
//!   `t` survivors adds `z C / sqrt(t)`, and a client refuses to help unmask a sum of fewer than
//!   `t` inputs), each client's contribution is clipped to L2 norm `C`, and epsilon is composed
//!   over every round that drew a sample, whatever its outcome. Delta is the configured one
//!   plus `(1 + e^epsilon)` times the summed probabilities that a round's sample fell below
//!   `min_clients` (such a round is skipped, which depends on the sample).
//! - *Against the server*, which knows every sample: no amplification. A client that took part
//!   in k rounds has spent the epsilon of k Gaussian mechanisms of multiplier z (q = 1); the
//!   server reports the largest such figure over its clients, and each client's ledger enforces
//!   its own.
//!
//! Not promised: protection against clients who collude to subtract their own noise (the noise
//! of the honest survivors alone is then `z C sqrt(honest / t)`), or against a client that skips
//! its own clipping: under secure aggregation nobody can check a norm, so a malicious client's
//! influence is bounded only by the quantizer's range per coordinate.

use std::collections::{BTreeMap, HashMap};

use rand::CryptoRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DpError {
    #[error("{0}")]
    Config(String),
}

/// Scales `update` so its L2 norm is at most `clip`. Returns the norm before clipping and
/// whether it was clipped. A non-finite update is zeroed (and counted as clipped).
pub fn clip_l2(update: &mut [f32], clip: f64) -> (f64, bool) {
    let norm = update.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
    if !norm.is_finite() {
        update.iter_mut().for_each(|v| *v = 0.0);
        return (norm, true);
    }
    if norm > clip {
        let scale = (clip / norm) as f32;
        update.iter_mut().for_each(|v| *v *= scale);
        (norm, true)
    } else {
        (norm, false)
    }
}

/// Clips each segment (lengths in `segments`) to its own bound in `clips`.
pub fn clip_segments(update: &mut [f32], segments: &[usize], clips: &[f64]) -> Vec<(f64, bool)> {
    let mut start = 0;
    segments
        .iter()
        .zip(clips)
        .map(|(&len, &c)| {
            let r = clip_l2(&mut update[start..start + len], c);
            start += len;
            r
        })
        .collect()
}

/// Adds N(0, std^2) to every coordinate, drawn from a cryptographic RNG.
pub fn add_gaussian_noise(update: &mut [f32], std: f64, rng: &mut impl CryptoRng) -> Result<(), DpError> {
    if std == 0.0 {
        return Ok(());
    }
    let normal = Normal::new(0.0, std).map_err(|e| DpError::Config(format!("noise standard deviation {std}: {e}")))?;
    for v in update.iter_mut() {
        *v += normal.sample(rng) as f32;
    }
    Ok(())
}

/// The standard deviation of one client's noise share under secure aggregation: with t the
/// reconstruction threshold, at least t shares are in any sum, so the sum's noise has standard
/// deviation at least `z C` whatever the dropouts.
pub fn noise_share_std(noise_multiplier: f64, clip: f64, threshold: usize) -> f64 {
    noise_multiplier * clip / (threshold.max(1) as f64).sqrt()
}

/// Adaptive clipping (Andrew et al. 2021, geometric update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClip {
    pub clip: f64,
    /// Learning rate of the update (default 0.2).
    pub eta: f64,
    /// Target quantile of update norms (default 0.5).
    pub target_quantile: f64,
}

impl AdaptiveClip {
    /// `unclipped_fraction`: the (noised) fraction of clients whose norm was at most `clip`.
    pub fn update(&mut self, unclipped_fraction: f64) -> f64 {
        let b = unclipped_fraction.clamp(0.0, 1.0);
        self.clip *= (-self.eta * (b - self.target_quantile)).exp();
        self.clip
    }
}

fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    a.max(b) + (-(a - b).abs()).exp().ln_1p()
}

fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

fn ln_binom(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 0.0 {
        r.ln()
    } else {
        // Asymptotic expansion for large x.
        -x * x - (x * std::f64::consts::PI.sqrt()).ln() + (1.0 - 0.5 / (x * x)).ln()
    }
}

/// log A_alpha for integer alpha.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (i_f, a_f) = (i as f64, alpha as f64);
        let coef = ln_binom(a_f, i_f) + i_f * q.ln() + (a_f - i_f) * (1.0 - q).ln();
        log_a = log_add(log_a, coef + (i_f * i_f - i_f) / (2.0 * sigma * sigma));
    }
    log_a
}

/// log A_alpha for fractional alpha (series of Mironov et al. 2019, section 3.3).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let mut i = 0f64;
    loop {
        // binom(alpha, i) for real alpha: sign from the falling factorial.
        let mut sign = 1.0;
        let mut k = 0f64;
        while k < i {
            if alpha - k < 0.0 {
                sign = -sign;
            }
            k += 1.0;
        }
        let log_coef = {
            let mut acc = 0.0;
            let mut k = 0f64;
            while k < i {
                acc += (alpha - k).abs().ln() - (k + 1.0).ln();
                k += 1.0;
            }
            acc
        };
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + i * (1.0 - q).ln();
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (2f64.sqrt() * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (2f64.sqrt() * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if sign > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        i += 1.0;
        if log_s0.max(log_s1) < -30.0 || i > 10_000.0 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism at order `alpha`.
pub fn sampled_gaussian_rdp(q: f64, noise_multiplier: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if noise_multiplier == 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * noise_multiplier * noise_multiplier);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, noise_multiplier, alpha as u64)
    } else {
        log_a_frac(q, noise_multiplier, alpha)
    };
    log_a / (alpha - 1.0)
}

/// The orders TF Privacy and Opacus use by default: 1.1 to 10.9 in steps of 0.1, then 12 to 63.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    orders.extend((12..64).map(|x| x as f64));
    orders
}

/// Composes the RDP of the rounds run so far, at a fixed set of orders.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl RdpAccountant {
    pub fn new(orders: Vec<f64>) -> Result<Self, DpError> {
        if orders.is_empty() || orders.iter().any(|a| !(a.is_finite() && *a > 1.0)) {
            return Err(DpError::Config("RDP orders must be finite and above 1".into()));
        }
        let rdp = vec![0.0; orders.len()];
        Ok(Self { orders, rdp })
    }

    /// Adds `steps` rounds of the sampled Gaussian mechanism with sampling rate `q`.
    pub fn compose(&mut self, q: f64, noise_multiplier: f64, steps: u64) {
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * sampled_gaussian_rdp(q, noise_multiplier, a);
        }
    }

    /// The smallest epsilon at `delta` over the orders, and the order that gives it.
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        let mut best = (f64::INFINITY, self.orders[0]);
        for (&r, &a) in self.rdp.iter().zip(&self.orders) {
            let eps = if delta * delta + (-r).exp_m1() >= 0.0 {
                0.0
            } else if a > 1.01 {
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            } else {
                f64::INFINITY
            };
            if eps < best.0 {
                best = (eps.max(0.0), a);
            }
        }
        best
    }
}

/// The epsilon at `delta` of `mechanisms` composed: each `(q, z, steps)` a Poisson-sampled
/// Gaussian of rate q and multiplier z, `steps` times (q = 1: no sampling).
pub fn composed_epsilon(mechanisms: impl IntoIterator<Item = (f64, f64, u64)>, delta: f64) -> f64 {
    let mut accountant = RdpAccountant::new(default_orders()).expect("default orders are valid");
    for (q, z, steps) in mechanisms {
        accountant.compose(q, z, steps);
    }
    accountant.epsilon(delta).0
}

/// The server's privacy account, free of I/O (the driver stores what it records and resumes it):
/// the sampled Gaussian of every round that drew a sample, against anyone who sees only the
/// models; each client's own rounds at q = 1, against the server, which knows every sample; and
/// the summed chance of too-small samples, which adds `(1 + e^epsilon)` times itself to delta.
#[derive(Debug, Clone)]
pub struct ServerAccount {
    delta: f64,
    amplified: RdpAccountant,
    /// Rounds per client, by noise multiplier (its bits).
    participations: HashMap<String, BTreeMap<u64, u64>>,
    too_few: f64,
}

impl ServerAccount {
    /// An empty account at the configured `delta`.
    pub fn new(delta: f64) -> Self {
        let amplified = RdpAccountant::new(default_orders()).expect("default orders are valid");
        Self { delta, amplified, participations: HashMap::new(), too_few: 0.0 }
    }

    /// One round that drew a sample at rate `q` with multiplier `z`, whatever became of it:
    /// `too_few` was the chance of a too-small sample, and `charged` were sent plans.
    pub fn record_round<'a>(&mut self, q: f64, z: f64, too_few: f64, charged: impl IntoIterator<Item = &'a String>) {
        self.amplified.compose(q, z, 1);
        self.too_few += too_few;
        for client in charged {
            self.add_participations(client, z, 1);
        }
    }

    /// `rounds` private rounds of `client` at multiplier `z` (from storage, on resuming).
    pub fn add_participations(&mut self, client: &str, z: f64, rounds: u64) {
        *self.participations.entry(client.to_string()).or_default().entry(z.to_bits()).or_default() += rounds;
    }

    /// Epsilon against anyone who sees only the models (amplified by sampling), at the
    /// configured delta.
    pub fn epsilon(&self) -> f64 {
        self.amplified.epsilon(self.delta).0
    }

    /// What [`ServerAccount::epsilon`] would be after one more round at `q` and `z`.
    pub fn epsilon_after(&self, q: f64, z: f64) -> f64 {
        let mut after = self.amplified.clone();
        after.compose(q, z, 1);
        after.epsilon(self.delta).0
    }

    /// Epsilon against the server: the largest any client has spent over its own rounds,
    /// unamplified.
    pub fn epsilon_against_server(&self) -> f64 {
        let mut distinct: Vec<&BTreeMap<u64, u64>> = self.participations.values().collect();
        distinct.sort();
        distinct.dedup();
        distinct
            .into_iter()
            .map(|counts| composed_epsilon(counts.iter().map(|(z, n)| (1.0, f64::from_bits(*z), *n)), self.delta))
            .fold(0.0, f64::max)
    }

    /// The delta both epsilons hold at: the configured one plus what too-small samples add.
    pub fn delta(&self) -> f64 {
        self.delta + (1.0 + self.epsilon().exp()) * self.too_few
    }
}

/// The differential-privacy settings of one secure round, as the plan carries them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpPlan {
    /// L2 bound C of each client's update this round.
    pub clip: f64,
    /// Clip each segment (trunk, heads) to `C sqrt(len / total)` instead of the whole update.
    pub per_segment: bool,
    /// The noise multiplier z the accountant composes (0: clipping only, no privacy claim).
    pub noise_multiplier: f64,
    /// Standard deviation of the noise on the count of unclipped updates (sigma_b of Andrew et
    /// al.); the update noise is raised so that both together are worth `z`.
    pub count_noise: f64,
    /// t: the fewest inputs in any sum the clients help unmask; each adds 1/t of the noise
    /// variance.
    pub min_survivors: usize,
    /// q: the probability with which each enrolled client was sampled into this round.
    pub sampling_rate: f64,
    /// The public number every sum is divided by: the expected number of clients in a round
    /// (q times the enrolled clients). Dividing by an actual count would reveal it; a fixed
    /// denominator keeps the mean a function of the noised sum alone (McMahan et al. 2018).
    pub expected_clients: f64,
}

impl DpPlan {
    pub fn check(&self) -> Result<(), DpError> {
        let bad = |m: String| Err(DpError::Config(m));
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip = {} must be a positive number", self.clip));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return bad(format!("noise_multiplier = {} must be zero or positive", self.noise_multiplier));
        }
        if !(self.count_noise.is_finite() && self.count_noise >= 0.0) {
            return bad(format!("count_noise = {} must be zero or positive", self.count_noise));
        }
        if self.noise_multiplier > 0.0 && 2.0 * self.count_noise <= self.noise_multiplier {
            return bad(format!(
                "count_noise = {} leaves no room for the update noise: it must exceed noise_multiplier / 2 = {} \
                 (Andrew et al. recommend about clients_per_round / 20)",
                self.count_noise,
                self.noise_multiplier / 2.0
            ));
        }
        if self.min_survivors == 0 {
            return bad("min_survivors must be at least 1".into());
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return bad(format!("sampling_rate = {} must be above 0 and at most 1", self.sampling_rate));
        }
        if !(self.expected_clients.is_finite() && self.expected_clients > 0.0) {
            return bad(format!("expected_clients = {} must be a positive number", self.expected_clients));
        }
        Ok(())
    }

    /// z_delta, the multiplier of the update noise: (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al.
    /// 2021, theorem 1), so that the update and the count released together are worth `z`.
    pub fn update_noise_multiplier(&self) -> f64 {
        if self.noise_multiplier == 0.0 {
            return 0.0;
        }
        let rest = self.noise_multiplier.powi(-2) - (2.0 * self.count_noise).powi(-2);
        if rest > 0.0 {
            rest.powf(-0.5)
        } else {
            f64::INFINITY
        }
    }

    /// One client's share of the update noise (per coordinate).
    pub fn update_share_std(&self) -> f64 {
        noise_share_std(self.update_noise_multiplier(), self.clip, self.min_survivors)
    }

    /// One client's share of the count noise.
    pub fn count_share_std(&self) -> f64 {
        if self.noise_multiplier == 0.0 {
            0.0
        } else {
            self.count_noise / (self.min_survivors as f64).sqrt()
        }
    }

    /// The range `[-r, r]` a quantizer's scale is chosen for: a clipped, noised coordinate and
    /// the centred indicator bit, with eight standard deviations of noise past the largest value.
    /// A private round's quantizer wraps values outside it rather than clamping them, so the
    /// range sets only the resolution, never the noise.
    pub fn coordinate_range(&self) -> f64 {
        (self.clip + 8.0 * self.update_share_std()).max(0.5 + 8.0 * self.count_share_std()).max(1.0)
    }
}

/// What one client's clipping did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipReport {
    /// L2 norm of the update before clipping.
    pub norm: f64,
    pub clipped: bool,
}

/// Clips `delta` to the plan's bound (whole or per segment), adds this client's share of the
/// noise to every coordinate (a segment it did not train is zero plus noise, so nothing says
/// which heads it trained), and returns the vector a DP round masks: the update, then the
/// centred indicator `[norm <= C] - 1/2` with its share of the count noise.
pub fn privatize(
    mut delta: Vec<f32>,
    segments: &[usize],
    plan: &DpPlan,
    rng: &mut impl CryptoRng,
) -> Result<(Vec<f32>, ClipReport), DpError> {
    let total: usize = segments.iter().sum();
    if total != delta.len() {
        return Err(DpError::Config(format!("segments cover {total} values, the update has {}", delta.len())));
    }
    let norm = delta.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
    let clipped = if plan.per_segment {
        let bounds: Vec<f64> =
            segments.iter().map(|&len| plan.clip * (len as f64 / total.max(1) as f64).sqrt()).collect();
        clip_segments(&mut delta, segments, &bounds).iter().any(|(_, c)| *c)
    } else {
        clip_l2(&mut delta, plan.clip).1
    };
    add_gaussian_noise(&mut delta, plan.update_share_std(), rng)?;
    let unclipped = norm.is_finite() && norm <= plan.clip;
    let mut indicator = [if unclipped { 0.5f32 } else { -0.5 }];
    add_gaussian_noise(&mut indicator, plan.count_share_std(), rng)?;
    delta.push(indicator[0]);
    Ok((delta, ClipReport { norm, clipped }))
}

/// The mean update and the noisy fraction of unclipped updates from the decoded sum of
/// [`privatize`] vectors (the values of `segments`, then the indicator). Every segment divides
/// by `expected_clients`, the public expected number of clients in a round, so the result is a
/// function of the noised sum alone: no count of contributors, exact or per head, is released
/// (a head trained by one client moves by noise whether or not that client took part). The
/// fraction is `indicator sum / expected + 1/2`, Andrew et al.'s estimate. `None` when the sum
/// has the wrong length.
pub fn mean_from_sum(decoded: &[f64], segments: &[usize], expected_clients: f64) -> Option<(Vec<f32>, f64)> {
    let params: usize = segments.iter().sum();
    if decoded.len() != params + 1 || expected_clients.is_nan() || expected_clients <= 0.0 {
        return None;
    }
    let mean = decoded[..params].iter().map(|v| (v / expected_clients) as f32).collect();
    let unclipped_fraction = decoded[params] / expected_clients + 0.5;
    Some((mean, unclipped_fraction))
}

/// The probability that a Poisson sample of `population` clients at rate `q` holds fewer than
/// `minimum`: the chance that a round is skipped for too few clients. The skip depends on who
/// was sampled, so the accountant adds it to delta (with the factor `1 + e^epsilon`; see the
/// module overview).
pub fn too_few_probability(population: usize, q: f64, minimum: usize) -> f64 {
    if minimum == 0 {
        return 0.0;
    }
    if minimum > population {
        return 1.0;
    }
    if q >= 1.0 {
        return 0.0;
    }
    if q <= 0.0 {
        return 1.0;
    }
    (0..minimum as u64).map(|k| binomial_pmf(population as u64, q, k)).sum::<f64>().min(1.0)
}

/// P[Binomial(n, q) = k].
pub fn binomial_pmf(n: u64, q: f64, k: u64) -> f64 {
    if k > n {
        return 0.0;
    }
    let (n, k) = (n as f64, k as f64);
    if q <= 0.0 || q >= 1.0 {
        let certain = if q <= 0.0 { 0.0 } else { n };
        return if k == certain { 1.0 } else { 0.0 };
    }
    (ln_binom(n, k) + k * q.ln() + (n - k) * (-q).ln_1p()).exp()
}

/// How a client's ledger counts what a round costs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accounting {
    /// Every round this client trains in is one Gaussian mechanism of the plan's multiplier,
    /// unamplified (q = 1): what holds against the server, which knows who it sampled. Rounds it
    /// is not sampled in cost nothing; a round number seen again is charged again.
    #[default]
    Participations,
    /// Every round of the federation since the client joined is charged as a sampled Gaussian
    /// at the plan's q, sampled or not: amplification by sampling, which holds only if the
    /// server's sampler is secret and honest. A data owner must say it trusts the sampler.
    SampledRounds,
}

/// Rounds of one mechanism the ledger has counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// The federation (see [`federation_key`]); empty in ledgers written before it was kept.
    #[serde(default)]
    pub federation: String,
    pub first_round: u64,
    pub last_round: u64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    /// How many mechanisms this entry stands for (0 in older ledgers: every round of the range).
    #[serde(default)]
    pub steps: u64,
}

impl Spent {
    /// How many rounds (mechanisms) the entry charges.
    pub fn count(&self) -> u64 {
        if self.steps == 0 {
            self.last_round.saturating_add(1).saturating_sub(self.first_round)
        } else {
            self.steps
        }
    }
}

/// What a ledger knows of one federation: the last round it counted there (sampled-rounds
/// accounting), and the largest sampling rate a plan of it stated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederationAccount {
    pub federation: String,
    pub accounted_through: u64,
    pub max_sampling_rate: f64,
}

/// The key a ledger binds its entries to: the fingerprint of the CA this client trusts (computed
/// by the client, not told by the server) and the server's federation id.
pub fn federation_key(ca_fingerprint: &str, federation_id: &str) -> String {
    format!("ca:{ca_fingerprint}/federation:{federation_id}")
}

/// The key a client's ledger charges one run of a federation under: round numbers start again at
/// 1 in every run, so each run is an account of its own (epsilon composes over all of them).
pub fn run_key(federation_key: &str, run: &str) -> String {
    format!("{federation_key}{RUN_KEY_SEPARATOR}{run}")
}

const RUN_KEY_SEPARATOR: &str = "/run:";

/// A [`run_key`] taken apart: the federation's key and the run's name (`None` for a key from
/// before runs were named).
pub fn split_run_key(key: &str) -> Option<(&str, &str)> {
    key.rsplit_once(RUN_KEY_SEPARATOR)
}

/// Why a client declines a round.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerRefusal {
    #[error("round {round} would take this client's epsilon to {would_be:.3}, past its budget of {max_epsilon} (delta {delta}); it takes no further part in private rounds")]
    OverBudget { round: u64, would_be: f64, max_epsilon: f64, delta: f64 },
    #[error("round {round} would take this client's epsilon in this run to {would_be:.3}, past its limit per run of {max_epsilon} (policy.max_epsilon_per_run); it takes no further part in this run's private rounds")]
    RunOverBudget { round: u64, would_be: f64, max_epsilon: f64 },
    #[error("this client's privacy budget of epsilon {max_epsilon} is spent ({spent:.3}); it takes no further part in private rounds")]
    Exhausted { max_epsilon: f64, spent: f64 },
    #[error("round {round} is not differentially private (no DP settings, or noise_multiplier 0): this client has a privacy budget and takes part only in private rounds")]
    NoNoise { round: u64 },
    #[error("round {round}'s privacy settings are invalid ({problem}); the server is misconfigured or misbehaving")]
    Invalid { round: u64, problem: String },
}

/// A client's own privacy account (see [`Accounting`] for what a round costs). A round that
/// would take the client past `max_epsilon` is declined, and so is every private round after
/// it, so its data is used no more. Every federation's rounds compose into the one figure: the
/// same data spent in two federations is spent twice. With sampled-rounds accounting, the rounds
/// between the client's last plan and a declined one were spent already, so the final figure can
/// pass the budget by those (each a fraction of a participation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    pub max_epsilon: f64,
    pub delta: f64,
    #[serde(default)]
    pub accounting: Accounting,
    pub spent: Vec<Spent>,
    #[serde(default)]
    pub federations: Vec<FederationAccount>,
    pub exhausted: bool,
}

impl PrivacyLedger {
    pub fn new(max_epsilon: f64, delta: f64, accounting: Accounting) -> Result<Self, DpError> {
        if !(max_epsilon.is_finite() && max_epsilon > 0.0) {
            return Err(DpError::Config(format!("max_epsilon = {max_epsilon} must be a positive number")));
        }
        if !(delta > 0.0 && delta < 1.0) {
            return Err(DpError::Config(format!("delta = {delta} must be between 0 and 1")));
        }
        Ok(Self { max_epsilon, delta, accounting, spent: Vec::new(), federations: Vec::new(), exhausted: false })
    }

    fn epsilon_of(&self, spent: &[Spent]) -> f64 {
        composed_epsilon(spent.iter().map(|s| (s.sampling_rate, s.noise_multiplier, s.count())), self.delta)
    }

    /// Epsilon spent so far, over every federation.
    pub fn epsilon(&self) -> f64 {
        self.epsilon_of(&self.spent)
    }

    /// The rounds this client trained in (participations accounting), or was counted for.
    pub fn rounds_charged(&self) -> u64 {
        self.spent.iter().map(Spent::count).sum()
    }

    /// What `round` of `federation` would add to `spent`, and the account after it.
    fn charge(&self, federation: &str, round: u64, joined_at: u64, plan: &DpPlan) -> (Vec<Spent>, FederationAccount) {
        let z = plan.noise_multiplier;
        let mut account =
            self.federations.iter().find(|a| a.federation == federation).cloned().unwrap_or(FederationAccount {
                federation: federation.to_string(),
                accounted_through: 0,
                max_sampling_rate: 0.0,
            });
        account.max_sampling_rate = account.max_sampling_rate.max(plan.sampling_rate);
        let entry = |first_round, last_round, sampling_rate, steps| Spent {
            federation: federation.to_string(),
            first_round,
            last_round,
            sampling_rate,
            noise_multiplier: z,
            steps,
        };
        let mut added = Vec::new();
        match self.accounting {
            Accounting::Participations => added.push(entry(round, round, 1.0, 1)),
            Accounting::SampledRounds if round <= account.accounted_through => {
                // A round number seen again (a restarted or lying server): another release.
                added.push(entry(round, round, plan.sampling_rate, 1));
            }
            Accounting::SampledRounds => {
                let first = if account.accounted_through == 0 {
                    joined_at.clamp(1, round)
                } else {
                    account.accounted_through + 1
                };
                // Rounds this client was not sent: charged at the largest rate this federation
                // has stated (q falls and rises with enrolment; the client saw none of those).
                if round > first {
                    added.push(entry(first, round - 1, account.max_sampling_rate, round - first));
                }
                added.push(entry(round, round, plan.sampling_rate, 1));
                account.accounted_through = round;
            }
        }
        (added, account)
    }

    /// Decides whether the client takes part in `round` of `federation` (with `plan`), having
    /// been connected since round `joined_at` at the latest. `Ok(epsilon)` charges the round
    /// (and with sampled-rounds accounting, the rounds since the last one counted); the caller
    /// persists the ledger before answering.
    pub fn admit(&mut self, federation: &str, round: u64, joined_at: u64, plan: &DpPlan) -> Result<f64, LedgerRefusal> {
        self.admit_within(federation, round, joined_at, plan, None)
    }

    /// Epsilon spent under one key (one run: [`run_key`]) alone.
    pub fn epsilon_under(&self, federation: &str) -> f64 {
        self.epsilon_of(&self.spent.iter().filter(|s| s.federation == federation).cloned().collect::<Vec<_>>())
    }

    /// [`PrivacyLedger::admit`], and with `per_key_cap` also declines a round that would take
    /// the epsilon spent under `federation` alone (one run) past that cap. Such a refusal closes
    /// only that run: the client takes part in other runs while its whole budget lasts.
    pub fn admit_within(
        &mut self,
        federation: &str,
        round: u64,
        joined_at: u64,
        plan: &DpPlan,
        per_key_cap: Option<f64>,
    ) -> Result<f64, LedgerRefusal> {
        if self.exhausted {
            return Err(LedgerRefusal::Exhausted { max_epsilon: self.max_epsilon, spent: self.epsilon() });
        }
        plan.check().map_err(|e| LedgerRefusal::Invalid { round, problem: e.to_string() })?;
        if plan.noise_multiplier == 0.0 {
            return Err(LedgerRefusal::NoNoise { round });
        }
        let (added, account) = self.charge(federation, round, joined_at, plan);
        let mut candidate = self.spent.clone();
        candidate.extend(added.iter().cloned());
        // The run's cap first: a round it refuses must not exhaust the whole budget, which other
        // runs may still use.
        if let Some(cap) = per_key_cap {
            let in_run: Vec<Spent> = candidate.iter().filter(|s| s.federation == federation).cloned().collect();
            let would_be = self.epsilon_of(&in_run);
            if would_be.is_nan() || would_be > cap {
                // The rounds before this one were spent already (sampled-rounds accounting).
                let spent_already: Vec<Spent> = added.into_iter().filter(|s| s.last_round < round).collect();
                self.record(spent_already, account);
                if self.epsilon() > self.max_epsilon {
                    self.exhausted = true;
                }
                return Err(LedgerRefusal::RunOverBudget { round, would_be, max_epsilon: cap });
            }
        }
        let would_be = self.epsilon_of(&candidate);
        // A NaN (which a valid plan cannot produce) refuses too.
        if would_be.is_nan() || would_be > self.max_epsilon {
            // The rounds before this one were spent already (sampled-rounds accounting).
            let spent_already: Vec<Spent> = added.into_iter().filter(|s| s.last_round < round).collect();
            self.record(spent_already, account);
            self.exhausted = true;
            return Err(LedgerRefusal::OverBudget {
                round,
                would_be,
                max_epsilon: self.max_epsilon,
                delta: self.delta,
            });
        }
        self.record(added, account);
        Ok(would_be)
    }

    /// Appends `added`, merging each entry into the last one when it continues it.
    fn record(&mut self, added: Vec<Spent>, account: FederationAccount) {
        for s in added {
            match self.spent.last_mut() {
                Some(last)
                    if last.federation == s.federation
                        && last.sampling_rate == s.sampling_rate
                        && last.noise_multiplier == s.noise_multiplier
                        && last.steps > 0 =>
                {
                    last.first_round = last.first_round.min(s.first_round);
                    last.last_round = last.last_round.max(s.last_round);
                    last.steps += s.steps;
                }
                _ => self.spent.push(s),
            }
        }
        match self.federations.iter_mut().find(|a| a.federation == account.federation) {
            Some(a) => *a = account,
            None => self.federations.push(account),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Review finding (issue 15): a round that the per-run cap refuses was checked against the
    /// whole budget first, and past it marked the ledger exhausted, so a cheap round of another
    /// run that fitted was refused for good. The cap decides first.
    #[test]
    fn a_round_the_run_cap_refuses_does_not_exhaust_the_whole_budget() {
        let plan = |z: f64| DpPlan {
            clip: 1.0,
            per_segment: false,
            noise_multiplier: z,
            count_noise: z,
            min_survivors: 3,
            sampling_rate: 1.0,
            expected_clients: 3.0,
        };
        let mut ledger = PrivacyLedger::new(9.0, 1e-5, Accounting::Participations).unwrap();
        let (a, b, c) = (run_key("f", "a"), run_key("f", "b"), run_key("f", "c"));
        assert_eq!(split_run_key(&a), Some(("f", "a")), "a run key comes apart as it was made");
        ledger.admit_within(&a, 1, 1, &plan(1.0), Some(6.0)).unwrap();
        ledger.admit_within(&b, 1, 1, &plan(1.0), Some(6.0)).unwrap();
        let refused = ledger.admit_within(&a, 2, 1, &plan(1.0), Some(6.0)).unwrap_err();
        assert!(matches!(refused, LedgerRefusal::RunOverBudget { .. }), "{refused}");
        assert!(!ledger.exhausted, "only run a is closed");
        let cheap = ledger.admit_within(&c, 1, 1, &plan(20.0), Some(6.0));
        assert!(cheap.is_ok(), "a cheap round of run c still fits: {cheap:?}");
        assert!(ledger.epsilon() <= 9.0);
    }

    #[test]
    fn known_answer_of_two_composed_mechanisms() {
        let orders: Vec<f64> = (2..=32).map(f64::from).collect();
        let mut acc = RdpAccountant::new(orders).unwrap();
        acc.compose(1e-5, 1.0, 10);
        acc.compose(1e-4, 3.0, 4);
        let (eps, order) = acc.epsilon(1e-5);
        assert!((eps - 0.336).abs() < 1e-3, "epsilon {eps}");
        assert_eq!(order, 23.0);
    }

    #[test]
    fn fractional_orders_agree_with_their_integer_neighbours() {
        for alpha in [2.0, 3.0, 8.0] {
            let int = sampled_gaussian_rdp(0.01, 1.1, alpha);
            let near = sampled_gaussian_rdp(0.01, 1.1, alpha + 1e-6);
            assert!((int - near).abs() < 1e-4 * int.max(1e-9), "alpha {alpha}: {int} vs {near}");
        }
        let lo = sampled_gaussian_rdp(0.01, 1.1, 2.5);
        assert!(lo > sampled_gaussian_rdp(0.01, 1.1, 2.0) && lo < sampled_gaussian_rdp(0.01, 1.1, 3.0));
    }

    #[test]
    fn epsilon_grows_with_rounds_and_sampling_rate() {
        let eps = |q: f64, steps: u64| {
            let mut acc = RdpAccountant::new(default_orders()).unwrap();
            acc.compose(q, 1.0, steps);
            acc.epsilon(1e-5).0
        };
        assert!(eps(0.01, 100) < eps(0.01, 200));
        assert!(eps(0.01, 100) < eps(0.02, 100));
        assert!(eps(0.01, 10) > 0.0);
        assert_eq!(eps(0.0, 100), 0.0);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut v, 1.0), (5.0, true));
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut small = vec![0.3f32, 0.4];
        let (norm, clipped) = clip_l2(&mut small, 1.0);
        assert!((norm - 0.5).abs() < 1e-6 && !clipped && small == vec![0.3, 0.4]);
        let mut nan = vec![f32::NAN, 1.0];
        assert!(clip_l2(&mut nan, 1.0).1 && nan == vec![0.0, 0.0]);
        let mut segs = vec![3.0f32, 4.0, 0.1];
        let r = clip_segments(&mut segs, &[2, 1], &[1.0, 1.0]);
        assert!(r[0].1 && !r[1].1 && segs[2] == 0.1);
    }

    #[test]
    fn noise_has_the_asked_standard_deviation() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let mut v = vec![0f32; 200_000];
        add_gaussian_noise(&mut v, 0.5, &mut rng).unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
        let sd = (v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        // The sample deviation of 200,000 draws is within 1% of the truth with overwhelming odds.
        assert!((sd - 0.5).abs() < 0.005 && mean.abs() < 0.005, "sd {sd}, mean {mean}");
        assert!((noise_share_std(1.0, 2.0, 4) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn adaptive_clipping_moves_the_right_way() {
        let mut all_clipped = AdaptiveClip { clip: 1.0, eta: 0.2, target_quantile: 0.5 };
        assert!(all_clipped.update(0.0) > 1.0, "when every update is clipped, C grows");
        let mut none_clipped = AdaptiveClip { clip: 1.0, eta: 0.2, target_quantile: 0.5 };
        assert!(none_clipped.update(1.0) < 1.0, "when no update is clipped, C shrinks");
        let mut on_target = AdaptiveClip { clip: 1.0, eta: 0.2, target_quantile: 0.5 };
        assert_eq!(on_target.update(0.5), 1.0);
    }

    fn plan(z: f64) -> DpPlan {
        DpPlan {
            clip: 1.0,
            per_segment: false,
            noise_multiplier: z,
            count_noise: 5.0,
            min_survivors: 4,
            sampling_rate: 0.1,
            expected_clients: 2.0,
        }
    }

    fn sum(vectors: &[Vec<f32>]) -> Vec<f64> {
        let mut total = vec![0f64; vectors[0].len()];
        for v in vectors {
            total.iter_mut().zip(v).for_each(|(t, x)| *t += *x as f64);
        }
        total
    }

    #[test]
    fn privatized_vectors_sum_to_the_clipped_mean_and_the_unclipped_fraction() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let clip_only = plan(0.0);
        let (a, ra) = privatize(vec![3.0, 4.0, 0.0], &[2, 1], &clip_only, &mut rng).unwrap();
        let (b, rb) = privatize(vec![0.1, 0.0, 0.2], &[2, 1], &clip_only, &mut rng).unwrap();
        assert!(ra.clipped && (ra.norm - 5.0).abs() < 1e-9 && !rb.clipped);
        assert_eq!(a.len(), 3 + 1, "the update and the indicator: no counts");
        let (mean, unclipped) = mean_from_sum(&sum(&[a, b]), &[2, 1], 2.0).unwrap();
        assert!((mean[0] - 0.35).abs() < 1e-6 && (mean[1] - 0.4).abs() < 1e-6 && (mean[2] - 0.1).abs() < 1e-6);
        assert!((unclipped - 0.5).abs() < 1e-9, "one of the two was clipped: {unclipped}");
        assert!(mean_from_sum(&[0.0; 3], &[2, 1], 2.0).is_none() && mean_from_sum(&[0.0; 4], &[2, 1], 0.0).is_none());

        let per_segment = DpPlan { per_segment: true, ..clip_only };
        let (c, _) = privatize(vec![3.0, 4.0, 1.0], &[2, 1], &per_segment, &mut rng).unwrap();
        let trunk = ((c[0] * c[0] + c[1] * c[1]) as f64).sqrt();
        assert!((trunk - (2.0f64 / 3.0).sqrt()).abs() < 1e-6 && (c[2] as f64 - (1.0f64 / 3.0).sqrt()).abs() < 1e-6);
        assert!(privatize(vec![1.0; 4], &[2, 1], &clip_only, &mut rng).is_err());
    }

    /// Attack: a head only one client trains. Protocol v1 summed a 0/1 weight per segment and
    /// divided by it, so the head moved if and only if that client took part, whatever the
    /// noise. Now nothing separates the two worlds but the Gaussian noise the accountant prices.
    #[test]
    fn a_head_trained_by_one_client_gives_no_exact_membership_signal() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
        let p = DpPlan { expected_clients: 3.0, min_survivors: 3, ..plan(1.0) };
        let segments = [4usize, 2];
        let others = |rng: &mut rand_chacha::ChaCha20Rng| -> Vec<Vec<f32>> {
            // Two clients that do not label the head: their head segment is zero.
            (0..2).map(|_| privatize(vec![0.3, -0.2, 0.1, 0.0, 0.0, 0.0], &segments, &p, rng).unwrap().0).collect()
        };
        let target = privatize(vec![0.1, 0.1, 0.1, 0.1, 0.5, -0.5], &segments, &p, &mut rng).unwrap().0;
        let mut without = others(&mut rng);
        let absent = mean_from_sum(&sum(&without), &segments, 3.0).unwrap().0;
        without.push(target);
        let present = mean_from_sum(&sum(&without), &segments, 3.0).unwrap().0;
        assert!(absent[4] != 0.0 && absent[5] != 0.0, "without the client the head still moves (by noise)");
        assert!(present[4] != 0.0);
        // The head's update is (sum + noise) / 3 either way; its noise has deviation z C / 3.
        let z_delta = p.update_noise_multiplier();
        let sd = z_delta * p.clip / 3.0;
        for h in [absent[4], absent[5]] {
            assert!((h as f64).abs() < 6.0 * sd, "{h} is noise of deviation {sd}");
        }
        // The exact rule v1 followed, for the record: divide by the number who trained it.
        let v1_head = |trained: f64, head_sum: f64| if trained >= 1.0 { head_sum / trained } else { 0.0 };
        assert_eq!(v1_head(0.0, 0.37), 0.0, "v1: absent means exactly unchanged");
    }

    #[test]
    fn update_and_count_noise_together_are_worth_z() {
        let p = plan(1.0);
        let z_delta = p.update_noise_multiplier();
        // Andrew et al.: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2.
        assert!((z_delta.powi(-2) + 10f64.powi(-2) - 1.0).abs() < 1e-12 && z_delta > 1.0);
        assert!((p.update_share_std() - z_delta / 2.0).abs() < 1e-12);
        assert!((p.count_share_std() - 2.5).abs() < 1e-12);
        assert!(DpPlan { count_noise: 0.5, ..p }.check().is_err());
        assert!(DpPlan { expected_clients: 0.0, ..p }.check().is_err());
        assert!(p.check().is_ok() && plan(0.0).check().is_ok());
        assert!(DpPlan { clip: 0.1, ..plan(0.0) }.coordinate_range() >= 1.0);

        // The noise of t shares has the standard deviation of the whole: z_delta C.
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let shares: Vec<Vec<f32>> =
            (0..p.min_survivors).map(|_| privatize(vec![0.0; 50_000], &[50_000], &p, &mut rng).unwrap().0).collect();
        let total = sum(&shares);
        let sd = (total[..50_000].iter().map(|x| x * x).sum::<f64>() / 50_000.0).sqrt();
        assert!((sd - z_delta).abs() < 0.02 * z_delta, "sd {sd}, expected {z_delta}");
    }

    #[test]
    fn the_chance_of_a_too_small_sample_matches_the_binomial() {
        // P[Bin(10, 0.5) < 3] = (1 + 10 + 45) / 1024.
        assert!((too_few_probability(10, 0.5, 3) - 56.0 / 1024.0).abs() < 1e-12);
        assert_eq!(too_few_probability(10, 1.0, 10), 0.0);
        assert_eq!(too_few_probability(10, 1.0, 11), 1.0);
        assert_eq!(too_few_probability(10, 0.3, 0), 0.0);
        // 6,000 clients at q = 0.1 (600 expected): 540 is 2.5 deviations below, 450 over 6.
        assert!(too_few_probability(6000, 0.1, 540) > 1e-3);
        assert!(too_few_probability(6000, 0.1, 450) < 1e-9);
    }

    fn unamplified(steps: u64, z: f64) -> f64 {
        let mut acc = RdpAccountant::new(default_orders()).unwrap();
        acc.compose(1.0, z, steps);
        acc.epsilon(1e-5).0
    }

    /// The server's two figures: amplified over every round, and against itself the most-charged
    /// client's own rounds; too-small samples add to delta.
    #[test]
    fn the_server_account_names_each_adversary() {
        let mut account = ServerAccount::new(1e-5);
        let (a, b) = ("a".to_string(), "b".to_string());
        account.record_round(0.1, 1.0, 1e-9, [&a, &b]);
        account.record_round(0.1, 1.0, 0.0, [&a]);
        account.record_round(0.1, 1.0, 1e-9, []);
        account.add_participations("a", 1.3, 2);
        let mut amplified = RdpAccountant::new(default_orders()).unwrap();
        amplified.compose(0.1, 1.0, 3);
        assert!((account.epsilon() - amplified.epsilon(1e-5).0).abs() < 1e-12);
        let most = composed_epsilon([(1.0, 1.0, 2), (1.0, 1.3, 2)], 1e-5);
        assert!((account.epsilon_against_server() - most).abs() < 1e-12, "client a's four rounds");
        assert!(account.epsilon_against_server() > unamplified(1, 1.0), "more than b's one round");
        let delta = 1e-5 + (1.0 + account.epsilon().exp()) * 2e-9;
        assert!((account.delta() - delta).abs() < 1e-18);
        assert!(account.epsilon_after(0.1, 1.0) > account.epsilon());
        assert_eq!(ServerAccount::new(1e-5).epsilon_against_server(), 0.0);
    }

    #[test]
    fn a_client_sampled_k_times_is_charged_k_unamplified_participations() {
        let p = plan(1.0);
        let mut ledger = PrivacyLedger::new(50.0, 1e-5, Accounting::Participations).unwrap();
        let fed = federation_key("ca1", "f1");
        // Sampled in 4 of 100 rounds.
        for round in [3, 40, 41, 97] {
            ledger.admit(&fed, round, 1, &p).unwrap();
        }
        assert_eq!(ledger.rounds_charged(), 4);
        assert!((ledger.epsilon() - unamplified(4, 1.0)).abs() < 1e-9, "q = 0.1 buys nothing against the server");
        let mut amplified = RdpAccountant::new(default_orders()).unwrap();
        amplified.compose(0.1, 1.0, 100);
        assert!(ledger.epsilon() > amplified.epsilon(1e-5).0, "4 unamplified participations cost more here");
        // A repeated round number (a reset or lying server) is charged again.
        ledger.admit(&fed, 97, 1, &p).unwrap();
        assert!((ledger.epsilon() - unamplified(5, 1.0)).abs() < 1e-9);
        // Another federation's rounds 1.. compose with this one's, each entry naming its own.
        let other = federation_key("ca1", "f2");
        ledger.admit(&other, 3, 1, &p).unwrap();
        assert!((ledger.epsilon() - unamplified(6, 1.0)).abs() < 1e-9);
        assert_eq!(ledger.spent.iter().filter(|s| s.federation == other).map(|s| s.steps).sum::<u64>(), 1);
        assert_eq!(ledger.spent.iter().filter(|s| s.federation == fed).map(|s| s.steps).sum::<u64>(), 5);
    }

    #[test]
    fn sampled_rounds_accounting_counts_every_round_and_declines_past_the_budget() {
        let p = plan(1.0);
        let fed = federation_key("ca", "f");
        let mut ledger = PrivacyLedger::new(4.0, 1e-5, Accounting::SampledRounds).unwrap();
        let first = ledger.admit(&fed, 5, 3, &p).unwrap();
        assert_eq!(ledger.rounds_charged(), 3, "rounds 3, 4 and 5");
        // A repeated round number costs one more round, not nothing.
        let again = ledger.admit(&fed, 5, 3, &p).unwrap();
        assert!(again > first && ledger.rounds_charged() == 4);
        // Gap rounds at the largest rate stated so far, here 0.2 from an earlier plan.
        let mut gaps = PrivacyLedger::new(40.0, 1e-5, Accounting::SampledRounds).unwrap();
        gaps.admit(&fed, 1, 1, &DpPlan { sampling_rate: 0.2, ..p }).unwrap();
        gaps.admit(&fed, 10, 1, &p).unwrap();
        let at = |q: f64| gaps.spent.iter().filter(|s| s.sampling_rate == q).map(|s| s.steps).sum::<u64>();
        assert_eq!((at(0.2), at(0.1)), (9, 1), "rounds 1-9 at 0.2 (2-9 unseen), round 10 at its own 0.1");
        let refusal = (6..10_000).find_map(|r| ledger.admit(&fed, r, 3, &p).err()).unwrap();
        assert!(matches!(refusal, LedgerRefusal::OverBudget { would_be, .. } if would_be > 4.0));
        assert!(ledger.epsilon() <= 4.0 && ledger.exhausted);
        assert!(matches!(ledger.admit(&fed, 100_000, 3, &p), Err(LedgerRefusal::Exhausted { .. })));
        let mut fresh = PrivacyLedger::new(3.0, 1e-5, Accounting::default()).unwrap();
        assert!(matches!(fresh.admit(&fed, 1, 1, &plan(0.0)), Err(LedgerRefusal::NoNoise { round: 1 })));
        let bogus = DpPlan { sampling_rate: f64::NAN, ..p };
        assert!(matches!(fresh.admit(&fed, 1, 1, &bogus), Err(LedgerRefusal::Invalid { round: 1, .. })));
        assert!(fresh.spent.is_empty(), "a refused plan counts nothing");
        assert!(PrivacyLedger::new(0.0, 1e-5, Accounting::default()).is_err());
        assert!(PrivacyLedger::new(1.0, 1.0, Accounting::default()).is_err());
    }

    #[test]
    fn a_ledger_written_before_federations_were_kept_still_counts() {
        let old = r#"{"max_epsilon":4.0,"delta":1e-5,"spent":[{"first_round":3,"last_round":9,"sampling_rate":0.1,"noise_multiplier":1.0}],"accounted_through":9,"exhausted":false}"#;
        let ledger: PrivacyLedger = serde_json::from_str(old).unwrap();
        assert_eq!(ledger.accounting, Accounting::Participations, "the safe default");
        assert_eq!(ledger.rounds_charged(), 7);
        let mut acc = RdpAccountant::new(default_orders()).unwrap();
        acc.compose(0.1, 1.0, 7);
        assert!((ledger.epsilon() - acc.epsilon(1e-5).0).abs() < 1e-12);
    }
}

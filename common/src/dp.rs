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

use rand::CryptoRng;
use rand_distr::{Distribution, Normal};

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
}

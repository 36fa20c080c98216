//! Fixed-point encoding of real vectors into Z_2^bits for masking, and back.
//!
//! Each coordinate is clipped to `[-clip, clip]`, shifted to `[0, 2 clip]`, scaled by `scale`
//! and rounded stochastically (up with probability equal to the fractional part), so the
//! encoding is unbiased. A sum of `n` encodings decodes as `sum / scale - n * clip`; it cannot
//! wrap the modulus when `n * ceil(2 clip scale) < 2^bits`, which [`Quantizer::check_capacity`]
//! checks before a round starts.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::crypto::modulus_mask;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantizer {
    /// 32 or 64.
    pub bits: u32,
    /// Coordinates are clipped to [-clip, clip].
    pub clip: f64,
    /// Quantization levels per unit.
    pub scale: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantizeError {
    #[error("bits = {0}: use 32 or 64")]
    Bits(u32),
    #[error("clip = {clip} and scale = {scale} must be positive and finite")]
    Range { clip: f64, scale: f64 },
    #[error("{cohort} clients x range 2 x {clip} x scale {scale} = {needed:.3e} levels overflow the modulus 2^{bits}; lower scale or clip, or use bits = 64")]
    Overflow { cohort: usize, clip: f64, scale: f64, bits: u32, needed: f64 },
}

impl Quantizer {
    /// The largest code one coordinate can take.
    pub fn max_code(&self) -> u64 {
        (2.0 * self.clip * self.scale).ceil() as u64
    }

    /// Refuses settings under which a sum of `cohort` encodings could wrap.
    pub fn check_capacity(&self, cohort: usize) -> Result<(), QuantizeError> {
        if self.bits != 32 && self.bits != 64 {
            return Err(QuantizeError::Bits(self.bits));
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.scale.is_finite() && self.scale > 0.0) {
            return Err(QuantizeError::Range { clip: self.clip, scale: self.scale });
        }
        let needed = cohort as f64 * (2.0 * self.clip * self.scale).ceil();
        if needed >= modulus_mask(self.bits) as f64 {
            return Err(QuantizeError::Overflow {
                cohort,
                clip: self.clip,
                scale: self.scale,
                bits: self.bits,
                needed,
            });
        }
        Ok(())
    }

    pub fn encode(&self, values: &[f32], rng: &mut impl Rng) -> Vec<u64> {
        let max = self.max_code();
        values
            .iter()
            .map(|&v| {
                let v = if v.is_finite() { (v as f64).clamp(-self.clip, self.clip) } else { 0.0 };
                let scaled = (v + self.clip) * self.scale;
                let floor = scaled.floor();
                let up = rng.random::<f64>() < scaled - floor;
                ((floor as u64) + u64::from(up)).min(max)
            })
            .collect()
    }

    /// Decodes a sum of `count` encodings.
    pub fn decode_sum(&self, sum: &[u64], count: usize) -> Vec<f64> {
        sum.iter().map(|&s| s as f64 / self.scale - count as f64 * self.clip).collect()
    }

    /// The largest error one decoded coordinate of a sum of `count` can have (rounding only).
    pub fn error_bound(&self, count: usize) -> f64 {
        count as f64 / self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn round_trip_within_the_bound_and_unbiased() {
        let q = Quantizer { bits: 32, clip: 1.0, scale: 1000.0 };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let xs = [0.12345f32, -0.5, 0.9999, -2.0, f32::NAN];
        let codes = q.encode(&xs, &mut rng);
        let back = q.decode_sum(&codes, 1);
        for (x, b) in [0.12345f64, -0.5, 0.9999, -1.0, 0.0].iter().zip(&back) {
            assert!((x - b).abs() <= q.error_bound(1) + 1e-9, "{x} -> {b}");
        }
        // Unbiased: the mean of many encodings of 0.0001234 (between two levels) is close to it.
        let many = q.encode(&vec![0.0001234f32; 20000], &mut rng);
        let mean = q.decode_sum(&[many.iter().sum()], 20000)[0] / 20000.0;
        assert!((mean - 0.0001234).abs() < 2e-5, "{mean}");
    }

    #[test]
    fn capacity_is_checked() {
        let q = Quantizer { bits: 32, clip: 1.0, scale: 1e6 };
        assert!(q.check_capacity(2000).is_ok());
        let err = q.check_capacity(3000).unwrap_err().to_string();
        assert!(err.contains("overflow") && err.contains("bits = 64"), "{err}");
        assert!(Quantizer { bits: 64, ..q }.check_capacity(1_000_000).is_ok());
        assert!(Quantizer { bits: 16, ..q }.check_capacity(1).is_err());
    }
}

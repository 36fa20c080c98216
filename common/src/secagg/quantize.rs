//! Fixed-point encoding of real vectors into Z_2^bits for masking, and back.
//!
//! Each coordinate is shifted by `clip`, scaled by `scale` and rounded stochastically (up with
//! probability equal to the fractional part), so the encoding is unbiased. What happens to a
//! value outside `[-clip, clip]` depends on `wrap`:
//!
//! - `wrap = false`: it is clamped to the range. A sum of `n` encodings decodes as
//!   `sum / scale - n * clip`; it cannot wrap the modulus when `n * ceil(2 clip scale) < 2^bits`,
//!   which [`Quantizer::check_capacity`] checks before a round starts.
//! - `wrap = true` (differential privacy): it is reduced modulo 2^bits instead, so no client's
//!   noise is ever cut. The sum decodes to the value nearest the expected offset `n * clip`
//!   modulo 2^bits / scale: exact while the true sum stays within half the modulus of it, and a
//!   wrap beyond that is a function of the noised sum alone (post-processing), so it costs no
//!   privacy.

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
    /// Reduce out-of-range values modulo 2^bits instead of clamping them.
    pub wrap: bool,
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
        let modulus = i128::from(modulus_mask(self.bits)) + 1;
        values
            .iter()
            .map(|&v| {
                let v = if v.is_finite() { v as f64 } else { 0.0 };
                if self.wrap {
                    // Rounded first, reduced in integers: f64 cannot hold 2^64 - x exactly.
                    // (A value past 2^127 saturates; it is garbage either way.)
                    let scaled = (v + self.clip) * self.scale;
                    let floor = scaled.floor();
                    let up = rng.random::<f64>() < scaled - floor;
                    ((floor as i128).saturating_add(i128::from(up)).rem_euclid(modulus)) as u64
                } else {
                    let scaled = (v.clamp(-self.clip, self.clip) + self.clip) * self.scale;
                    let floor = scaled.floor();
                    let up = rng.random::<f64>() < scaled - floor;
                    ((floor as u64) + u64::from(up)).min(max)
                }
            })
            .collect()
    }

    /// Decodes a sum of `count` encodings.
    pub fn decode_sum(&self, sum: &[u64], count: usize) -> Vec<f64> {
        if !self.wrap {
            return sum.iter().map(|&s| s as f64 / self.scale - count as f64 * self.clip).collect();
        }
        // The representative of each sum modulo 2^bits nearest the offset of `count` encodings.
        let mask = modulus_mask(self.bits);
        let offset = (count as f64 * self.clip * self.scale).round().rem_euclid(mask as f64 + 1.0) as u64 & mask;
        let half = mask / 2 + 1;
        sum.iter()
            .map(|&s| {
                let d = s.wrapping_sub(offset) & mask;
                let centred = if d >= half { d as f64 - (mask as f64 + 1.0) } else { d as f64 };
                centred / self.scale
            })
            .collect()
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
        let q = Quantizer { bits: 32, clip: 1.0, scale: 1000.0, wrap: false };
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
        let q = Quantizer { bits: 32, clip: 1.0, scale: 1e6, wrap: false };
        assert!(q.check_capacity(2000).is_ok());
        let err = q.check_capacity(3000).unwrap_err().to_string();
        assert!(err.contains("overflow") && err.contains("bits = 64"), "{err}");
        assert!(Quantizer { bits: 64, ..q }.check_capacity(1_000_000).is_ok());
        assert!(Quantizer { bits: 16, ..q }.check_capacity(1).is_err());
    }

    #[test]
    fn wrapped_encodings_never_clamp_and_decode_exactly() {
        for bits in [32, 64] {
            let q = Quantizer { bits, clip: 1.0, scale: 1000.0, wrap: true };
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(bits as u64);
            // Far outside the range (a large noise draw): clamping would lose it, wrapping keeps it.
            let values = [[5.0f32, -0.25, -7.5], [-4.0, 0.5, 0.125], [0.0, 0.0, 9.0]];
            let mask = modulus_mask(bits);
            let mut sum = vec![0u64; 3];
            for v in &values {
                for (s, c) in sum.iter_mut().zip(q.encode(v, &mut rng)) {
                    assert!(c <= mask);
                    *s = s.wrapping_add(c) & mask;
                }
            }
            let decoded = q.decode_sum(&sum, 3);
            for (d, e) in decoded.iter().zip([1.0, 0.25, 1.625]) {
                assert!((d - e).abs() <= q.error_bound(3) + 1e-9, "{bits} bits: {decoded:?}");
            }
            let clamped = Quantizer { wrap: false, ..q };
            let mut sum = vec![0u64; 3];
            for v in &values {
                for (s, c) in sum.iter_mut().zip(clamped.encode(v, &mut rng)) {
                    *s += c;
                }
            }
            assert!((clamped.decode_sum(&sum, 3)[0] - 1.0).abs() > 0.5, "clamping cuts the out-of-range values");
        }
    }
}

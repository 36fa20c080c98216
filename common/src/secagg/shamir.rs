//! Shamir t-of-n secret sharing over GF(2^8), byte by byte.
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree t - 1;
//! share `x` (1..=255) holds the polynomials' values at `x`. Any t shares give the secret by
//! Lagrange interpolation at 0; fewer give no information. Field arithmetic is constant-time
//! (carry-less multiplication, inversion by exponentiation): no secret-indexed tables.

use rand::CryptoRng;
use zeroize::{Zeroize, Zeroizing};

/// The reduction polynomial x^8 + x^4 + x^3 + x + 1 (AES).
const POLY: u16 = 0x11b;

fn mul(a: u8, b: u8) -> u8 {
    let (mut a, mut b, mut p) = (a as u16, b, 0u16);
    for _ in 0..8 {
        p ^= a & (0u16.wrapping_sub((b & 1) as u16));
        b >>= 1;
        a <<= 1;
        a ^= POLY & (0u16.wrapping_sub((a >> 8) & 1));
    }
    p as u8
}

/// a^254 = a^-1 for a != 0.
fn inv(a: u8) -> u8 {
    let mut result = 1u8;
    let mut base = a;
    let mut e = 254u8;
    while e > 0 {
        if e & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    result
}

/// One share: the evaluation point and the values.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, Zeroize)]
#[zeroize(drop)]
pub struct Share {
    pub x: u8,
    #[serde(with = "serde_bytes")]
    pub y: Vec<u8>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share(x = {}, {} bytes, redacted)", self.x, self.y.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShamirError {
    #[error("threshold {t} with {n} shares: need 1 <= t <= n <= 255")]
    Parameters { t: usize, n: usize },
    #[error("{got} shares, {needed} needed")]
    TooFew { got: usize, needed: usize },
    #[error("shares are inconsistent (duplicate point or different lengths)")]
    Inconsistent,
}

/// Splits `secret` into `n` shares at points 1..=n, any `t` of which recover it.
pub fn split(secret: &[u8], t: usize, n: usize, rng: &mut impl CryptoRng) -> Result<Vec<Share>, ShamirError> {
    if t == 0 || t > n || n > 255 {
        return Err(ShamirError::Parameters { t, n });
    }
    let mut shares: Vec<Share> = (1..=n as u8).map(|x| Share { x, y: Vec::with_capacity(secret.len()) }).collect();
    let mut coefficients = Zeroizing::new(vec![0u8; t]);
    for &byte in secret {
        coefficients[0] = byte;
        rng.fill_bytes(&mut coefficients[1..]);
        for share in &mut shares {
            // Horner's rule from the highest coefficient.
            let mut acc = 0u8;
            for &c in coefficients.iter().rev() {
                acc = mul(acc, share.x) ^ c;
            }
            share.y.push(acc);
        }
    }
    Ok(shares)
}

/// Recovers the secret from at least `t` shares (the first `t` are used).
pub fn combine(shares: &[Share], t: usize) -> Result<Zeroizing<Vec<u8>>, ShamirError> {
    interpolate(shares, t, 0)
}

/// The value of the sharing polynomials at `at` from the first `t` shares: the secret at 0, or
/// the share a holder at `at` was dealt (what someone with t shares can compute of every other
/// share, which is why a share must never be encrypted with a key another message reuses).
pub fn interpolate(shares: &[Share], t: usize, at: u8) -> Result<Zeroizing<Vec<u8>>, ShamirError> {
    if shares.len() < t || t == 0 {
        return Err(ShamirError::TooFew { got: shares.len(), needed: t });
    }
    let used = &shares[..t];
    let len = used[0].y.len();
    for (i, a) in used.iter().enumerate() {
        if a.x == 0 || a.y.len() != len || used[..i].iter().any(|b| b.x == a.x) {
            return Err(ShamirError::Inconsistent);
        }
    }
    // Lagrange basis at `at`: l_i = prod_{j != i} (at - x_j) / (x_i - x_j); subtraction is xor.
    let basis: Vec<u8> = used
        .iter()
        .map(|si| used.iter().filter(|sj| sj.x != si.x).fold(1u8, |acc, sj| mul(acc, mul(at ^ sj.x, inv(sj.x ^ si.x)))))
        .collect();
    let mut secret = Zeroizing::new(vec![0u8; len]);
    for (share, l) in used.iter().zip(&basis) {
        for (s, y) in secret.iter_mut().zip(&share.y) {
            *s ^= mul(*y, *l);
        }
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn field_inverse() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "a = {a}");
        }
        assert_eq!(mul(0x57, 0x83), 0xc1); // FIPS-197's worked example
    }

    proptest! {
        #[test]
        fn any_t_shares_recover_the_secret(secret in proptest::collection::vec(any::<u8>(), 1..40), n in 1usize..20, t_frac in 0.0f64..1.0, seed: u64) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let mut shares = split(&secret, t, n, &mut rng).unwrap();
            shares.reverse();
            prop_assert_eq!(&combine(&shares[..t], t).unwrap()[..], &secret[..]);
            if t > 1 {
                prop_assert!(combine(&shares[..t - 1], t).is_err());
                // t - 1 shares with a wrong extra point give a different value (not the secret),
                // with overwhelming probability for secrets of a few bytes.
            }
        }
    }

    #[test]
    fn bad_parameters_and_inputs() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0);
        assert!(split(b"x", 0, 3, &mut rng).is_err());
        assert!(split(b"x", 4, 3, &mut rng).is_err());
        assert!(split(b"x", 2, 256, &mut rng).is_err());
        let shares = split(b"secret", 2, 3, &mut rng).unwrap();
        let dup = vec![shares[0].clone(), shares[0].clone()];
        assert_eq!(combine(&dup, 2).unwrap_err(), ShamirError::Inconsistent);
        let zero = vec![Share { x: 0, y: shares[0].y.clone() }, shares[1].clone()];
        assert_eq!(combine(&zero, 2).unwrap_err(), ShamirError::Inconsistent);
        let short = vec![shares[0].clone(), Share { x: shares[1].x, y: shares[1].y[..3].to_vec() }];
        assert_eq!(combine(&short, 2).unwrap_err(), ShamirError::Inconsistent);
        // Two shares give the third.
        assert_eq!(&interpolate(&shares[..2], 2, shares[2].x).unwrap()[..], &shares[2].y[..]);
    }
}

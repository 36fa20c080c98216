//! Secure aggregation: SecAgg+ (Bell et al. 2020) with the dropout recovery of Bonawitz et al.
//! 2017, as one state machine per role and no I/O.
//!
//! A round has four phases. The server drives them; every client answers each phase once:
//!
//! 1. **Advertise keys.** Each client makes two X25519 key pairs (one to encrypt shares, one to
//!    derive pairwise masks) and signs both public keys, the round and its id with its
//!    certificate key ([`AdvertSigner`]).
//! 2. **Share keys.** The server hands each client the adverts of its neighbours in a
//!    k-regular graph ([`graph`]). The client checks every neighbour's certificate and signature
//!    against the CA ([`PeerVerifier`]) before it encrypts anything to them (so a server that
//!    swaps keys is caught), then Shamir-shares (t of its neighbours) a fresh self-mask seed and
//!    its mask key, and encrypts each neighbour's pair of shares with ChaCha20-Poly1305 under a
//!    key agreed with that neighbour, bound to round, sender and receiver.
//! 3. **Masked input.** Each client adds to its quantized vector the expansion of its self-mask
//!    seed and, for every neighbour that sent it shares, the pairwise mask (added towards
//!    higher-indexed neighbours, subtracted towards lower ones, so pairs cancel in the sum).
//! 4. **Unmask.** The server names the survivors and the dropped; each survivor returns, for
//!    each neighbour, the self-mask share of a survivor or the mask-key share of a dropped one,
//!    never both for one peer (a request that asks for both is refused). The server rebuilds
//!    the survivors' self-masks and the dropped clients' pairwise masks and removes them.
//!
//! [`SecAggServer`] keeps only the running sum of masked inputs, never one input. With at least
//! t responding neighbours for every secret it must rebuild, the sum is exact (modulo 2^bits);
//! otherwise [`SecAggServer::finish`] fails and the round aborts.
//!
//! Secrets (key pairs, seeds, shares) are zeroized when dropped and redacted from `Debug`.

pub mod crypto;
pub mod graph;
pub mod quantize;
pub mod shamir;

mod client;
mod server;

pub use client::SecAggClient;
pub use server::SecAggServer;

use serde::{Deserialize, Serialize};

use crate::round::ClientId;
use quantize::{QuantizeError, Quantizer};
use shamir::Share;

/// Settings of secure aggregation (the `[federation.secagg]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggParams {
    /// Shares needed to rebuild a secret (t).
    pub threshold: usize,
    /// Neighbours per client (k); the graph is complete when the cohort has at most k + 1.
    pub degree: usize,
    /// The largest fraction of a neighbourhood that may drop while the sum stays exact.
    pub dropout_tolerance: f64,
    pub quantizer: Quantizer,
}

/// Everything the clients need to start a secure round: the same for all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    pub round: u64,
    pub params: SecAggParams,
    /// The cohort, sorted; a client's index is its position.
    pub cohort: Vec<ClientId>,
    /// Seed of the neighbour graph (public randomness).
    pub graph_seed: u64,
    /// Length of the vectors being summed.
    pub vector_len: usize,
}

impl SecAggSetup {
    /// The degree actually used for this cohort.
    pub fn effective_degree(&self) -> usize {
        self.params.degree.min(self.cohort.len().saturating_sub(1))
    }

    /// Checks that t, k and the cohort size give the sum with the promised dropout tolerance,
    /// and that the sum cannot wrap the modulus.
    pub fn check(&self) -> Result<(), SecAggError> {
        let n = self.cohort.len();
        let p = &self.params;
        let bad = |m: String| Err(SecAggError::Config(m));
        if n < 2 {
            return bad(format!("secure aggregation needs at least 2 clients in the cohort, got {n}"));
        }
        if n > 255 && p.degree >= 255 {
            return bad("degree must be below 255 (shares are points of GF(256))".into());
        }
        let k = self.effective_degree();
        if k % 2 == 1 && n % 2 == 1 && k + 1 != n {
            return bad(format!("an odd degree ({k}) needs an even cohort (got {n}); use an even degree"));
        }
        if !(0.0..1.0).contains(&p.dropout_tolerance) {
            return bad(format!("dropout_tolerance = {} must be in [0, 1)", p.dropout_tolerance));
        }
        // Security: more than half of a neighbourhood must be needed, so that the shares the
        // server can collect for one client never reach t for both of its secrets.
        if p.threshold * 2 <= k || p.threshold > k {
            return bad(format!(
                "threshold = {} must be more than half of the degree {k} and at most {k}",
                p.threshold
            ));
        }
        let survivors = ((k as f64) * (1.0 - p.dropout_tolerance)).floor() as usize;
        if p.threshold > survivors {
            return bad(format!(
                "threshold = {} cannot be met when {:.0}% of {k} neighbours drop ({survivors} remain); lower the threshold or the tolerance, or raise the degree",
                p.threshold,
                p.dropout_tolerance * 100.0
            ));
        }
        if self.cohort.windows(2).any(|w| w[0] >= w[1]) {
            return bad("the cohort must be sorted and without duplicates".into());
        }
        p.quantizer.check_capacity(n).map_err(SecAggError::Quantize)?;
        Ok(())
    }

    pub fn neighbours(&self) -> Vec<Vec<usize>> {
        graph::harary(self.cohort.len(), self.effective_degree(), self.graph_seed)
    }
}

/// Phase 1: a client's signed public keys.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyAdvert {
    pub client: ClientId,
    pub cipher_pk: [u8; 32],
    pub mask_pk: [u8; 32],
    /// The client's certificate (DER), to check the signature and the CA's.
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for KeyAdvert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAdvert").field("client", &self.client).finish_non_exhaustive()
    }
}

impl KeyAdvert {
    /// The bytes the signature covers.
    pub fn signed_message(round: u64, client: &str, cipher_pk: &[u8; 32], mask_pk: &[u8; 32]) -> Vec<u8> {
        let mut m = b"cohort-secagg-advert-v1".to_vec();
        m.extend_from_slice(&round.to_be_bytes());
        m.extend_from_slice(&(client.len() as u32).to_be_bytes());
        m.extend_from_slice(client.as_bytes());
        m.extend_from_slice(cipher_pk);
        m.extend_from_slice(mask_pk);
        m
    }
}

/// Phase 2: one neighbour's encrypted pair of shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedShares {
    pub from: ClientId,
    pub to: ClientId,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// Phase 3: a masked, quantized vector (raw little-endian `u64`s on the wire).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedInput {
    #[serde(with = "raw_u64")]
    pub values: Vec<u64>,
}

/// Masked values travel as raw little-endian integers, 4 bytes each when they all fit (a 32-bit
/// modulus) and 8 otherwise, after a one-byte width.
mod raw_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let narrow = values.iter().all(|v| *v <= u32::MAX as u64);
        let width = if narrow { 4 } else { 8 };
        let mut bytes = Vec::with_capacity(1 + values.len() * width);
        bytes.push(width as u8);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes()[..width]);
        }
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        let Some((&width, body)) = bytes.split_first() else {
            return Err(serde::de::Error::custom("empty masked input"));
        };
        let width = width as usize;
        if !(width == 4 || width == 8) || body.len() % width != 0 {
            return Err(serde::de::Error::custom("masked input is not a whole number of 4- or 8-byte values"));
        }
        Ok(body
            .chunks_exact(width)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..width].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect())
    }
}

/// Encodes a client's weighted update for a secure sum: each segment of `delta` (the trunk, then
/// each head; `segments` gives their lengths) multiplied by its weight, then the weights
/// themselves, quantized. A segment the client did not train has weight 0. The sum of these gives
/// every segment's weighted FedAvg numerator and denominator without revealing any one client's
/// weight or which heads it trained.
pub fn encode_weighted(
    delta: &[f32],
    segments: &[usize],
    weights: &[f32],
    quantizer: &Quantizer,
    rng: &mut impl rand::Rng,
) -> Vec<u64> {
    debug_assert_eq!(segments.iter().sum::<usize>(), delta.len());
    let mut v = Vec::with_capacity(delta.len() + segments.len());
    let mut start = 0;
    for (&len, &w) in segments.iter().zip(weights) {
        v.extend(delta[start..start + len].iter().map(|d| d * w));
        start += len;
    }
    v.extend_from_slice(&weights[..segments.len()]);
    quantizer.encode(&v, rng)
}

/// A client's FedAvg weight: `min(samples / sample_cap, 1)`, public cap so weights stay in [0, 1].
pub fn sample_weight(samples: u64, sample_cap: u64) -> f32 {
    (samples as f64 / sample_cap.max(1) as f64).min(1.0) as f32
}

/// The per-segment weighted mean from the secure sum of `survivors` encodings (see
/// [`encode_weighted`]): the mean delta (zero in a segment nobody trained, which leaves it
/// unchanged) and each segment's total weight; `None` when no segment has weight.
pub fn weighted_mean_from_sum(
    sum: &[u64],
    survivors: usize,
    segments: &[usize],
    quantizer: &Quantizer,
) -> Option<(Vec<f32>, Vec<f64>)> {
    let decoded = quantizer.decode_sum(sum, survivors);
    let params: usize = segments.iter().sum();
    if decoded.len() != params + segments.len() {
        return None;
    }
    let (values, totals) = decoded.split_at(params);
    // Below one quantization step of a single client's weight, a total is rounding noise.
    let floor = survivors as f64 / quantizer.scale;
    if totals.iter().all(|t| *t <= floor) {
        return None;
    }
    let mut mean = Vec::with_capacity(params);
    let mut start = 0;
    for (&len, &total) in segments.iter().zip(totals) {
        let seg = &values[start..start + len];
        if total > floor {
            mean.extend(seg.iter().map(|v| (v / total) as f32));
        } else {
            mean.extend(std::iter::repeat_n(0.0f32, len));
        }
        start += len;
    }
    Some((mean, totals.to_vec()))
}

impl std::fmt::Debug for MaskedInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MaskedInput({} values)", self.values.len())
    }
}

/// Phase 4, server to clients: who sent a masked input and who dropped after sharing keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    pub survivors: Vec<ClientId>,
    pub dropped: Vec<ClientId>,
}

/// Phase 4, client to server: shares of survivors' self-mask seeds and of dropped clients'
/// mask keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmaskReply {
    pub seed_shares: Vec<(ClientId, Share)>,
    pub key_shares: Vec<(ClientId, Share)>,
}

/// Signs a key advertisement with the client's certificate key.
pub trait AdvertSigner {
    fn certificate(&self) -> Vec<u8>;
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String>;
}

/// Checks a neighbour's certificate against the CA, that it names `client`, and its signature.
pub trait PeerVerifier {
    fn verify(&self, client: &str, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecAggError {
    #[error("secure aggregation settings: {0}")]
    Config(String),
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    /// A peer (the server, or a client through the server) sent something invalid.
    #[error("{0}")]
    Peer(String),
    /// The server asked for something a client must refuse, or substituted keys.
    #[error("the server misbehaved: {0}")]
    Server(String),
    /// A message arrived in the wrong phase (a driver bug or a confused peer).
    #[error("{0} is not expected in phase {1}")]
    Phase(&'static str, &'static str),
    /// Too few clients are left for the sum.
    #[error("round aborted: {0}")]
    Abort(String),
    #[error("signing the key advertisement: {0}")]
    Sign(String),
}

pub(crate) fn pairwise_info(round: u64, a: usize, b: usize) -> [[u8; 8]; 3] {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    [round.to_be_bytes(), (lo as u64).to_be_bytes(), (hi as u64).to_be_bytes()]
}

#[cfg(test)]
mod harness;

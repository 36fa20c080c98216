//! Secure aggregation: SecAgg+ (Bell et al. 2020) with the dropout recovery and the consistency
//! check of Bonawitz et al. 2017, as one state machine per role and no I/O.
//!
//! A session sums one vector per client. Everything the clients sign or derive is bound to the
//! session id ([`SecAggSetup::session_id`]): the round, what is summed (`purpose`), the cohort,
//! every parameter, and a fresh nonce from every client that joined, so nothing of one session
//! (not even a rerun of the same setup) verifies in another, and the neighbour graph is seeded
//! by randomness the server cannot choose. The server drives six phases; every client answers
//! each once:
//!
//! 0. **Join.** Each client sends a fresh nonce; the server sends every client the same list of
//!    who joined with which nonce ([`JoinList`]), and a client goes on only if its own nonce is
//!    in it.
//! 1. **Advertise keys.** Each client makes two X25519 key pairs (one to encrypt shares, one to
//!    derive pairwise masks) and a self-mask seed, and signs both public keys and a commitment to
//!    the seed with its certificate key ([`AdvertSigner`]). The server checks the signature too,
//!    so a client with a bad advert is named and left out before anyone encrypts to it.
//! 2. **Share keys.** The server hands each client the adverts of its neighbours in a
//!    k-regular graph ([`graph`]). The client checks every neighbour's certificate and signature
//!    against the CA ([`PeerVerifier`]); a neighbour that fails is left out (and reported), not
//!    a reason to abort. It Shamir-shares (t of its neighbours) the seed and its mask key, and
//!    encrypts each neighbour's pair of shares with ChaCha20-Poly1305 under a key agreed with that
//!    neighbour *for this direction* (so the two messages of an edge never share a keystream),
//!    with a public commitment to each share beside the ciphertext.
//! 3. **Masked input.** Each client opens the shares sent to it (a share that does not match its
//!    commitment is reported, and the client holds nothing of that sender) and adds to its
//!    quantized vector the expansion of its self-mask seed and, for every neighbour with whom it
//!    exchanged shares, the pairwise mask (added towards higher-indexed neighbours, subtracted
//!    towards lower ones, so pairs cancel in the sum). It signs the list of neighbours it masked
//!    against.
//! 4. **Consistency.** The server sends every client that sent a masked input the same list of
//!    them (the survivors); each signs it. A client refuses a list that omits it, names strangers
//!    or twice the same client, or holds fewer than `min_inputs`.
//! 5. **Unmask.** The server forwards each client the signatures of the session's *committee*
//!    (about 2k clients drawn by the session id, [`SecAggSetup::committee`]) and its surviving
//!    neighbours' signed lists of whom they masked against. A client reveals nothing unless a
//!    quorum of the committee (about 2t) signed exactly the list it signed, every survivor whose
//!    seed it would reveal masked against all of its surviving neighbours, and every connected
//!    part of the graph among the survivors holds at least `min_inputs` clients. Then it returns, for each
//!    neighbour whose shares it holds, the self-mask share of a survivor or the mask-key share of
//!    a dropped one, never both for one peer. The server checks every returned share against its
//!    commitment (a wrong one names its sender as a cheater and is not used), rebuilds the
//!    survivors' seeds (checked against their commitments) and the dropped clients' keys (checked
//!    against their public keys), and removes the masks.
//!
//! Why the checks of phase 5: the server learns the sum of any group of survivors whose seeds it
//! gets and whose every mask with a client outside the group it can remove. Different survivor
//! lists for different clients (or for different regions of the graph) would let it collect one
//! client's seed and its neighbours' keys, or unmask a group smaller than `min_inputs`; the
//! committee's quorum stops that, as each honest client signs one list and the quorum is more
//! than half of the committee, so one list at most is ever accepted (with c colluding committee
//! members signing anything, the quorum must exceed (m + c) / 2). Withholding some shares would
//! let it cut a small group off from the rest (its members mask only among themselves); the
//! signed masking lists stop that. And when dropouts (real or claimed) split the survivors'
//! graph, each part's sum could be unmasked alone; the size check stops that. With the one list,
//! the server gets both kinds of share of a client only from colluding neighbours: t of them.
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
pub use server::{SecAggServer, Unmasked};

use serde::{Deserialize, Serialize};

use crate::peer::ClientId;
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

/// Everything the clients need to start a secure session: the same for all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    pub round: u64,
    /// What is summed (`train`, `census`, `evaluate`): part of the session id, so keys and
    /// signatures of one kind of sum cannot be replayed into another of the same round.
    pub purpose: String,
    pub params: SecAggParams,
    /// The cohort, sorted; a client's index is its position.
    pub cohort: Vec<ClientId>,
    /// Length of the vectors being summed.
    pub vector_len: usize,
    /// The fewest inputs a sum may hold: clients refuse to sign (and so to unmask) a survivor
    /// list shorter than this, or one whose graph falls apart into smaller groups, so the server
    /// never learns a sum of fewer.
    pub min_inputs: usize,
}

/// The most clients one session may have (the graph and the messages grow with it).
pub const MAX_COHORT: usize = 1 << 20;
/// The most neighbour entries (clients x degree) a session's graph may have: every client holds
/// the whole graph (64 MiB at most), to check the survivors' graph for small parts.
pub const MAX_GRAPH_EDGES: usize = 1 << 23;

impl SecAggSetup {
    /// The degree actually used for this cohort.
    pub fn effective_degree(&self) -> usize {
        self.params.degree.min(self.cohort.len().saturating_sub(1))
    }

    /// The session id: a hash of the whole setup and of who joined with which nonce. Every
    /// signature, key and commitment of the session is bound to it, and it seeds the graph.
    pub fn session_id(&self, joined: &JoinList) -> [u8; 32] {
        let config = bincode::config::standard();
        let setup = bincode::serde::encode_to_vec(self, config).expect("a setup always encodes");
        let joined = bincode::serde::encode_to_vec(joined, config).expect("a join list always encodes");
        crypto::hash(b"cohort-secagg-session-v2", &[&setup, &joined])
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
        if n > MAX_COHORT || n.saturating_mul(p.degree.min(n)) > MAX_GRAPH_EDGES {
            return bad(format!(
                "a cohort of {n} clients of degree {} is more than one session takes ({MAX_COHORT} clients, \
                 {MAX_GRAPH_EDGES} neighbour entries)",
                p.degree
            ));
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
        if self.min_inputs == 0 || self.min_inputs > n {
            return bad(format!("min_inputs = {} must be between 1 and the cohort size {n}", self.min_inputs));
        }
        if self.cohort.windows(2).any(|w| w[0] >= w[1]) {
            return bad("the cohort must be sorted and without duplicates".into());
        }
        p.quantizer.check_capacity(n).map_err(SecAggError::Quantize)?;
        Ok(())
    }

    /// The neighbour graph of session `session`: a Harary graph over a permutation seeded by the
    /// session id, which holds every joined client's nonce, so the server cannot pick it.
    pub fn neighbours(&self, session: &[u8; 32]) -> Vec<Vec<usize>> {
        let seed = u64::from_be_bytes(session[..8].try_into().expect("8 bytes"));
        graph::harary(self.cohort.len(), self.effective_degree(), seed)
    }

    /// The session's committee, whose quorum must sign a survivor list before anyone reveals:
    /// the whole cohort when it has at most 2k clients, else 2k of them drawn by the session id.
    /// Sorted.
    pub fn committee(&self, session: &[u8; 32]) -> Vec<usize> {
        use rand::seq::index::sample;
        use rand::SeedableRng;
        let n = self.cohort.len();
        let m = (2 * self.effective_degree()).max(1);
        if n <= m {
            return (0..n).collect();
        }
        let seed = crypto::hash(b"cohort-secagg-committee-v2", &[session]);
        let mut members = sample(&mut rand_chacha::ChaCha20Rng::from_seed(seed), n, m).into_vec();
        members.sort_unstable();
        members
    }

    /// How many committee members must sign a list: t / k of the committee, rounded up (more
    /// than half, since t > k / 2), so the consistency phase tolerates the dropouts the shares do.
    pub fn quorum(&self, committee: usize) -> usize {
        let (t, k) = (self.params.threshold, self.effective_degree().max(1));
        (committee * t).div_ceil(k).max(committee / 2 + 1).min(committee)
    }

    /// The index of `id` in the cohort.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.cohort.binary_search_by(|c| c.as_str().cmp(id)).ok()
    }

    /// The indices of a list of cohort members a peer sent, which must be sorted and without
    /// repeats (join lists, survivor lists, masking lists); the error says what is wrong, with
    /// the peer's string escaped.
    pub(crate) fn sorted_indices<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Result<Vec<usize>, String> {
        let mut indices: Vec<usize> = Vec::new();
        for id in ids {
            let i = self.index_of(id).ok_or_else(|| format!("{} is not in the cohort", shown(id)))?;
            if indices.last().is_some_and(|&last| last >= i) {
                return Err(format!("the list is not sorted or names {} twice", shown(id)));
            }
            indices.push(i);
        }
        Ok(indices)
    }

    /// The session id of `joined` under `weakened` (tests: a session the server alone chose).
    pub(crate) fn session_under(&self, joined: &JoinList, weakened: Weakened) -> [u8; 32] {
        if weakened.server_chosen_session {
            self.session_id(&JoinList { joined: Vec::new() })
        } else {
            self.session_id(joined)
        }
    }
}

/// A client id a peer sent, quoted for an error message: escaped and capped.
pub(crate) fn shown(id: &str) -> String {
    format!("`{}`", crate::peer::escape(id, 64))
}

/// `label`, the session id and `numbers` (big-endian): the bytes behind every key derivation,
/// associated data and signed message of a session, so each is bound to the session and to
/// what it is for.
fn bound_to(label: &[u8], session: &[u8; 32], numbers: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut m = label.to_vec();
    m.extend_from_slice(session);
    for n in numbers {
        m.extend_from_slice(&n.to_be_bytes());
    }
    m
}

/// Phase 0: who joined a session with which fresh nonce, sorted by client. The same list goes to
/// every client that joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinList {
    pub joined: Vec<Joined>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    pub client: ClientId,
    pub nonce: [u8; 32],
}

/// Phase 1: a client's signed public keys and its commitment to its self-mask seed.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyAdvert {
    pub client: ClientId,
    pub cipher_pk: [u8; 32],
    pub mask_pk: [u8; 32],
    /// `hash(session, client, seed)`: the server checks the seed it rebuilds against it, so a
    /// wrong share cannot silently turn the sum into noise.
    pub seed_commitment: [u8; 32],
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
    pub fn signed_message(
        session: &[u8; 32],
        client: &str,
        cipher_pk: &[u8; 32],
        mask_pk: &[u8; 32],
        seed_commitment: &[u8; 32],
    ) -> Vec<u8> {
        let mut m = b"cohort-secagg-advert-v2".to_vec();
        m.extend_from_slice(session);
        m.extend_from_slice(&(client.len() as u32).to_be_bytes());
        m.extend_from_slice(client.as_bytes());
        m.extend_from_slice(cipher_pk);
        m.extend_from_slice(mask_pk);
        m.extend_from_slice(seed_commitment);
        m
    }
}

/// Phase 2: one neighbour's encrypted pair of shares, with a commitment to each share. The
/// commitments hide the shares (each share is uniformly random) and bind them: the receiver
/// checks them when it opens the ciphertext, and the server checks what the receiver returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedShares {
    pub from: ClientId,
    pub to: ClientId,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    pub seed_commitment: [u8; 32],
    pub key_commitment: [u8; 32],
}

/// Phase 2, client to server: shares for every neighbour whose advert checked out, and the
/// neighbours whose adverts did not (left out of this client's session).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedKeys {
    pub sealed: Vec<SealedShares>,
    pub refused: Vec<ClientId>,
}

/// Phase 3: a masked, quantized vector (raw little-endian `u64`s on the wire), the neighbours
/// whose shares did not open or did not match their commitments, and the client's signed list
/// of the neighbours it masked against.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedInput {
    #[serde(with = "raw_u64")]
    pub values: Vec<u64>,
    pub invalid_shares_from: Vec<ClientId>,
    pub masking: MaskingList,
}

/// The neighbours a client masked against (sorted), signed by it. Before revealing a survivor's
/// seed share, its neighbours check that it masked against every neighbour that survived: a
/// server that withheld shares to cut a small group off from the rest cannot hide it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskingList {
    pub client: ClientId,
    pub masked_with: Vec<ClientId>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for MaskingList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MaskingList({} masked with {} neighbours)", self.client, self.masked_with.len())
    }
}

impl MaskingList {
    /// The bytes the signature covers: the session, the client and its masking partners.
    pub fn signed_message(session: &[u8; 32], client: usize, masked_with: &[usize]) -> Vec<u8> {
        let numbers = [client, masked_with.len()].into_iter().chain(masked_with.iter().copied()).map(|i| i as u64);
        bound_to(b"cohort-secagg-masked-with-v2", session, numbers)
    }
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

impl std::fmt::Debug for MaskedInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MaskedInput({} values, {} invalid shares)", self.values.len(), self.invalid_shares_from.len())
    }
}

/// Phase 4, server to clients: who sent a masked input (sorted). The same for everybody.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurvivorList {
    pub survivors: Vec<ClientId>,
}

impl SurvivorList {
    /// The bytes a client signs to confirm the list.
    pub fn signed_message(session: &[u8; 32], survivors: &[usize]) -> Vec<u8> {
        let numbers = std::iter::once(survivors.len()).chain(survivors.iter().copied()).map(|i| i as u64);
        bound_to(b"cohort-secagg-survivors-v2", session, numbers)
    }
}

/// A committee member's signature over the survivor list, with its certificate (the client
/// receiving it need not be its neighbour).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Confirmation {
    pub client: ClientId,
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Confirmation({})", self.client)
    }
}

/// Phase 5, server to a client: the committee's confirmations of the survivor list, and the
/// surviving neighbours' lists of whom they masked against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    pub confirmations: Vec<Confirmation>,
    pub masking: Vec<MaskingList>,
}

/// Phase 5, client to server: shares of survivors' self-mask seeds and of dropped clients'
/// mask keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmaskReply {
    pub seed_shares: Vec<(ClientId, Share)>,
    pub key_shares: Vec<(ClientId, Share)>,
}

/// Encodes a client's weighted update for a secure sum: each segment of `delta` (the trunk, then
/// each head; `segments` gives their lengths) multiplied by its weight, then the weights
/// themselves, quantized. A segment the client did not train has weight 0. The sum of these gives
/// every segment's weighted FedAvg numerator and denominator without revealing any one client's
/// weight or which heads it trained. `None` when the lengths do not fit together.
pub fn encode_weighted(
    delta: &[f32],
    segments: &[usize],
    weights: &[f32],
    quantizer: &Quantizer,
    rng: &mut impl rand::Rng,
) -> Option<Vec<u64>> {
    if segments.iter().sum::<usize>() != delta.len() || weights.len() != segments.len() {
        return None;
    }
    let mut v = Vec::with_capacity(delta.len() + segments.len());
    let mut start = 0;
    for (&len, &w) in segments.iter().zip(weights) {
        v.extend(delta[start..start + len].iter().map(|d| d * w));
        start += len;
    }
    v.extend_from_slice(weights);
    Some(quantizer.encode(&v, rng))
}

/// A client's FedAvg weight: `min(samples / sample_cap, 1)`, public cap so weights stay in [0, 1].
pub fn sample_weight(samples: u64, sample_cap: u64) -> f32 {
    (samples as f64 / sample_cap.max(1) as f64).min(1.0) as f32
}

/// The per-segment weighted mean from the secure sum of `survivors` encodings (see
/// [`encode_weighted`]): the mean delta (zero in a segment nobody trained, which leaves it
/// unchanged), each coordinate within `[-clip, clip]` as every encoded one is, and each
/// segment's total weight; `None` when no segment has weight or a total is more than the
/// survivors could give (an out-of-range input).
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
    if totals.iter().all(|t| *t <= floor) || totals.iter().any(|t| *t > survivors as f64 + floor) {
        return None;
    }
    let clip = quantizer.clip;
    let mut mean = Vec::with_capacity(params);
    let mut start = 0;
    for (&len, &total) in segments.iter().zip(totals) {
        let seg = &values[start..start + len];
        if total > floor {
            mean.extend(seg.iter().map(|v| (v / total).clamp(-clip, clip) as f32));
        } else {
            mean.extend(std::iter::repeat_n(0.0f32, len));
        }
        start += len;
    }
    Some((mean, totals.to_vec()))
}

/// Signs a key advertisement with the client's certificate key.
pub trait AdvertSigner {
    fn certificate(&self) -> Vec<u8>;
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String>;
}

/// Why a peer's signed message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The certificate is not a client certificate of this federation for that id (a stranger's,
    /// another CA's, expired): the sender is left out, not named a cheater (an honest client's
    /// certificate can expire mid-connection).
    #[error("{0}")]
    Certificate(String),
    /// The certificate is fine and the signature does not verify: tampering or cheating.
    #[error("{0}")]
    Signature(String),
}

/// Checks a neighbour's certificate against the CA, that it names `client`, and its signature.
pub trait PeerVerifier {
    fn verify(&self, client: &str, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Rejection>;
    /// Checks only the signature, with the key of a certificate [`PeerVerifier::verify`] has
    /// already accepted in this session.
    fn verify_signature(&self, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String>;
}

/// The phases of a secure sum, in order: one vocabulary for the server state machine, the
/// coordinator that drives it, the client daemon's fault hooks and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Plans out, nonces back.
    Join,
    /// The join list out, signed key adverts back.
    Advertise,
    /// The neighbours' adverts out, sealed shares back.
    ShareKeys,
    /// The shares out, masked inputs back (once each client has trained).
    MaskedInput,
    /// The survivor list out, signed confirmations back.
    Confirm,
    /// The confirmations out, shares for unmasking back.
    Unmask,
}

impl Phase {
    /// The phase's short name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Join => "join",
            Phase::Advertise => "advertise keys",
            Phase::ShareKeys => "share keys",
            Phase::MaskedInput => "masked input",
            Phase::Confirm => "confirm the survivors",
            Phase::Unmask => "unmask",
        }
    }

    /// What the phase waits for, for logs and reports.
    pub fn wanted(self) -> &'static str {
        match self {
            Phase::Join => "a nonce (its answer to the plan)",
            Phase::Advertise => "a key advert",
            Phase::ShareKeys => "sealed shares",
            Phase::MaskedInput => "a masked input",
            Phase::Confirm => "a confirmation of the survivor list",
            Phase::Unmask => "shares for unmasking",
        }
    }

    /// Where in the session it is, in plain words.
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Join => "when the plans went out",
            Phase::Advertise | Phase::ShareKeys => "during the key exchange",
            Phase::MaskedInput => "while collecting the masked updates",
            Phase::Confirm => "while the survivors confirmed who is in the sum",
            Phase::Unmask => "while unmasking the sum",
        }
    }
}

/// The fewest inputs of a secure sum of counts (a label census, a federated evaluation): a sum
/// of one or two clients' histograms is (nearly) each of them. The coordinator never asks for
/// less, and a client never sends counts into less.
pub const MIN_COUNT_INPUTS: usize = 3;

/// The fewest inputs of a secure sum of updates: a sum of one is the update.
pub const MIN_TRAIN_INPUTS: usize = 2;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecAggError {
    /// Local misuse or settings that cannot work.
    #[error("secure aggregation settings: {0}")]
    Config(String),
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    /// A peer (the server, or a client through the server) sent something malformed or out of
    /// place.
    #[error("{0}")]
    Peer(String),
    /// A client proved to cheat: a signature that does not verify, a share that does not match
    /// its commitment, shares that do not rebuild the secret it committed to.
    #[error("client `{client}` cheated: {what}")]
    Cheater { client: ClientId, what: String },
    /// The server asked for something a client must refuse, or substituted keys.
    #[error("the server misbehaved: {0}")]
    Server(String),
    /// A message arrived in the wrong phase (a driver bug or a confused peer).
    #[error("{0} is not expected in phase {1}")]
    Phase(&'static str, &'static str),
    /// Too few clients are left for the sum, or the checks before revealing failed (which
    /// dropouts can cause as well as a server that misbehaves).
    #[error("round aborted: {0}")]
    Abort(String),
    #[error("signing: {0}")]
    Sign(String),
}

/// Protections a test can switch off, to show that its attack succeeds without them. Only test
/// builds can set them; in every other build they are all off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Weakened {
    /// One key for both directions of an edge (the two-time pad of protocol v1).
    pub symmetric_share_keys: bool,
    /// Reveal shares without checking the committee's confirmations of the survivor list.
    pub skip_consistency_check: bool,
    /// Count confirmations from t neighbours instead of the committee's quorum (the first
    /// version of this change: consistent only within each neighbourhood).
    pub neighbourhood_consistency: bool,
    /// Sign adverts with the round only, not the session (v1: replayable across sums).
    pub unbound_adverts: bool,
    /// Use returned shares without checking them against their commitments, and rebuilt seeds
    /// without checking them against the advert.
    pub trust_returned_shares: bool,
    /// Abort the client's session on a neighbour's bad advert instead of leaving it out.
    pub abort_on_bad_advert: bool,
    /// Reveal without checking the survivors' masking lists or the size of the graph's parts.
    pub skip_masking_check: bool,
    /// Leave the clients' nonces out of the session id (a server-chosen session, as in v1).
    pub server_chosen_session: bool,
    /// Let a client that confirmed a survivor list (and answered its unmask request) confirm
    /// another and answer again: both kinds of share of one peer come back.
    pub answer_twice: bool,
    /// Hold the shares a neighbour dealt without checking them against their commitments.
    pub hold_unchecked_shares: bool,
    /// Route the shares of an edge dealt one way only, instead of leaving one of its ends out.
    pub route_one_way_edges: bool,
    /// Use a sum outside what the survivors' in-range inputs can give.
    pub unchecked_sum_range: bool,
}

/// The advert message of protocol v1 (round only); what [`Weakened::unbound_adverts`] signs.
pub(crate) fn advert_message_v1(round: u64, client: &str, cipher_pk: &[u8; 32], mask_pk: &[u8; 32]) -> Vec<u8> {
    let mut m = b"cohort-secagg-advert-v1".to_vec();
    m.extend_from_slice(&round.to_be_bytes());
    m.extend_from_slice(&(client.len() as u32).to_be_bytes());
    m.extend_from_slice(client.as_bytes());
    m.extend_from_slice(cipher_pk);
    m.extend_from_slice(mask_pk);
    m
}

/// The bytes an advert's signature covers, under `weakened`.
pub(crate) fn advert_message(
    setup: &SecAggSetup,
    session: &[u8; 32],
    advert: &KeyAdvert,
    weakened: Weakened,
) -> Vec<u8> {
    if weakened.unbound_adverts {
        advert_message_v1(setup.round, &advert.client, &advert.cipher_pk, &advert.mask_pk)
    } else {
        KeyAdvert::signed_message(session, &advert.client, &advert.cipher_pk, &advert.mask_pk, &advert.seed_commitment)
    }
}

/// HKDF `info` of the key that encrypts the shares `from` sends `to`: the direction is part of
/// it, so the two messages of one edge never share a key (and the zero nonce stays safe).
pub(crate) fn share_key_info(session: &[u8; 32], from: usize, to: usize, weakened: Weakened) -> Vec<u8> {
    let (a, b) = if weakened.symmetric_share_keys { (from.min(to), from.max(to)) } else { (from, to) };
    bound_to(b"shares-v2", session, [a as u64, b as u64])
}

/// HKDF `info` of the pairwise mask between `a` and `b`: the same from both ends.
pub(crate) fn mask_info(session: &[u8; 32], a: usize, b: usize) -> Vec<u8> {
    bound_to(b"mask-v2", session, [a.min(b) as u64, a.max(b) as u64])
}

/// Associated data of the shares `from` sends `to`.
pub(crate) fn share_aad(session: &[u8; 32], from: usize, to: usize) -> Vec<u8> {
    bound_to(b"cohort-secagg-shares-v2", session, [from as u64, to as u64])
}

/// The commitment to one share `from` dealt `to` (`kind`: `seed` or `key`).
pub fn share_commitment(session: &[u8; 32], kind: &str, from: usize, to: usize, share: &Share) -> [u8; 32] {
    crypto::hash(
        b"cohort-secagg-share-commitment-v2",
        &[session, kind.as_bytes(), &(from as u64).to_be_bytes(), &(to as u64).to_be_bytes(), &[share.x], &share.y],
    )
}

/// The commitment to a client's self-mask seed, signed in its advert.
pub fn seed_commitment(session: &[u8; 32], client: usize, seed: &[u8; 32]) -> [u8; 32] {
    crypto::hash(b"cohort-secagg-seed-commitment-v2", &[session, &(client as u64).to_be_bytes(), seed])
}

#[cfg(test)]
mod attacks;
#[cfg(test)]
pub(crate) mod harness;

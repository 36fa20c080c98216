//! The client's side of SecAgg+: one value per round, moved through the four phases.

use std::collections::{BTreeMap, BTreeSet};

use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{self, KeyPair, Secret32};
use super::shamir::{self, Share};
use super::{
    pairwise_info, AdvertSigner, KeyAdvert, MaskedInput, PeerVerifier, SealedShares, SecAggError, SecAggSetup,
    UnmaskReply, UnmaskRequest,
};

/// What a neighbour advertised, once checked.
struct Peer {
    cipher_pk: [u8; 32],
    mask_pk: [u8; 32],
}

/// The plaintext inside a [`SealedShares`].
#[derive(Serialize, Deserialize)]
struct SharePair {
    round: u64,
    from: usize,
    to: usize,
    seed: Share,
    key: Share,
}

enum Phase {
    Advertised,
    SharesSent { peers: BTreeMap<usize, Peer>, self_seed: Secret32 },
    MaskedSent { held: BTreeMap<usize, (Share, Share)> },
    Done,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Advertised => "advertise keys",
            Phase::SharesSent { .. } => "share keys",
            Phase::MaskedSent { .. } => "masked input",
            Phase::Done => "done",
        }
    }
}

pub struct SecAggClient {
    setup: SecAggSetup,
    me: usize,
    neighbours: BTreeSet<usize>,
    cipher: KeyPair,
    mask: KeyPair,
    phase: Phase,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggClient")
            .field("round", &self.setup.round)
            .field("me", &self.me)
            .field("phase", &self.phase.name())
            .finish_non_exhaustive()
    }
}

fn share_aad(round: u64, from: usize, to: usize) -> Vec<u8> {
    let mut aad = b"cohort-secagg-shares-v1".to_vec();
    aad.extend_from_slice(&round.to_be_bytes());
    aad.extend_from_slice(&(from as u64).to_be_bytes());
    aad.extend_from_slice(&(to as u64).to_be_bytes());
    aad
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<4096>()
}

impl SecAggClient {
    /// Phase 1: checks the setup, makes this round's keys and the signed advertisement.
    pub fn start(
        me: &str,
        setup: SecAggSetup,
        signer: &dyn AdvertSigner,
        rng: &mut impl CryptoRng,
    ) -> Result<(Self, KeyAdvert), SecAggError> {
        setup.check()?;
        let index = setup
            .cohort
            .binary_search_by(|c| c.as_str().cmp(me))
            .map_err(|_| SecAggError::Server(format!("`{me}` is not in the round's cohort")))?;
        let neighbours: BTreeSet<usize> = setup.neighbours().swap_remove(index).into_iter().collect();
        let cipher = KeyPair::generate(rng);
        let mask = KeyPair::generate(rng);
        let message = KeyAdvert::signed_message(setup.round, me, &cipher.public(), &mask.public());
        let advert = KeyAdvert {
            client: me.to_string(),
            cipher_pk: cipher.public(),
            mask_pk: mask.public(),
            certificate: signer.certificate(),
            signature: signer.sign(&message).map_err(SecAggError::Sign)?,
        };
        Ok((Self { setup, me: index, neighbours, cipher, mask, phase: Phase::Advertised }, advert))
    }

    pub fn round(&self) -> u64 {
        self.setup.round
    }

    fn index_of(&self, id: &str) -> Result<usize, SecAggError> {
        self.setup
            .cohort
            .binary_search_by(|c| c.as_str().cmp(id))
            .map_err(|_| SecAggError::Server(format!("`{id}` is not in the cohort")))
    }

    /// Phase 2: checks the neighbours' adverts, then shares this client's secrets with them.
    pub fn handle_adverts(
        &mut self,
        adverts: &[KeyAdvert],
        verifier: &dyn PeerVerifier,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<SealedShares>, SecAggError> {
        if !matches!(self.phase, Phase::Advertised) {
            return Err(SecAggError::Phase("key adverts", self.phase.name()));
        }
        let round = self.setup.round;
        let mut peers = BTreeMap::new();
        for advert in adverts {
            let j = self.index_of(&advert.client)?;
            if !self.neighbours.contains(&j) {
                return Err(SecAggError::Server(format!(
                    "sent the advert of `{}`, who is not a neighbour",
                    advert.client
                )));
            }
            let message = KeyAdvert::signed_message(round, &advert.client, &advert.cipher_pk, &advert.mask_pk);
            verifier.verify(&advert.client, &advert.certificate, &message, &advert.signature).map_err(|e| {
                SecAggError::Server(format!(
                    "the key advert of `{}` does not verify ({e}); keys may have been substituted, aborting",
                    advert.client
                ))
            })?;
            if peers.insert(j, Peer { cipher_pk: advert.cipher_pk, mask_pk: advert.mask_pk }).is_some() {
                return Err(SecAggError::Server(format!("sent the advert of `{}` twice", advert.client)));
            }
        }
        let t = self.setup.params.threshold;
        if peers.len() < t {
            return Err(SecAggError::Abort(format!("only {} neighbours advertised keys, {t} are needed", peers.len())));
        }
        let mut self_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut self_seed[..]);
        let seed_shares =
            shamir::split(&self_seed[..], t, peers.len(), rng).map_err(|e| SecAggError::Config(e.to_string()))?;
        let key_shares = shamir::split(&self.mask.secret_bytes()[..], t, peers.len(), rng)
            .map_err(|e| SecAggError::Config(e.to_string()))?;
        let mut sealed = Vec::with_capacity(peers.len());
        for ((&j, peer), (seed, key)) in peers.iter().zip(seed_shares.into_iter().zip(key_shares)) {
            let pair = SharePair { round, from: self.me, to: j, seed, key };
            let plaintext = Zeroizing::new(
                bincode::serde::encode_to_vec(&pair, bincode_config())
                    .map_err(|e| SecAggError::Config(e.to_string()))?,
            );
            let key = self
                .cipher
                .agree(&peer.cipher_pk, &[b"shares", &pairwise_info(round, self.me, j).concat()])
                .map_err(|e| SecAggError::Peer(format!("`{}`: {e}", self.setup.cohort[j])))?;
            sealed.push(SealedShares {
                from: self.setup.cohort[self.me].clone(),
                to: self.setup.cohort[j].clone(),
                ciphertext: crypto::seal(&key, &share_aad(round, self.me, j), &plaintext),
            });
        }
        self.phase = Phase::SharesSent { peers, self_seed };
        Ok(sealed)
    }

    /// Phase 3: opens the shares sent to this client and masks `input` (already quantized).
    pub fn handle_shares(&mut self, sealed: &[SealedShares], input: &[u64]) -> Result<MaskedInput, SecAggError> {
        let Phase::SharesSent { peers, self_seed } = &self.phase else {
            return Err(SecAggError::Phase("sealed shares", self.phase.name()));
        };
        let round = self.setup.round;
        let bits = self.setup.params.quantizer.bits;
        let modmask = crypto::modulus_mask(bits);
        if input.len() != self.setup.vector_len || input.iter().any(|v| *v > modmask) {
            return Err(SecAggError::Config(format!(
                "the input must be {} values below 2^{bits}",
                self.setup.vector_len
            )));
        }
        let mut held = BTreeMap::new();
        for s in sealed {
            let j = self.index_of(&s.from)?;
            let Some(peer) = peers.get(&j) else {
                return Err(SecAggError::Server(format!(
                    "forwarded shares from `{}`, who is not an advertised neighbour",
                    s.from
                )));
            };
            if s.to != self.setup.cohort[self.me] {
                return Err(SecAggError::Server(format!("forwarded shares meant for `{}`", s.to)));
            }
            let key = self
                .cipher
                .agree(&peer.cipher_pk, &[b"shares", &pairwise_info(round, j, self.me).concat()])
                .map_err(|e| SecAggError::Peer(format!("`{}`: {e}", s.from)))?;
            let plaintext = crypto::open(&key, &share_aad(round, j, self.me), &s.ciphertext)
                .map_err(|e| SecAggError::Peer(format!("shares from `{}`: {e}", s.from)))?;
            let (pair, used): (SharePair, usize) = bincode::serde::decode_from_slice(&plaintext, bincode_config())
                .map_err(|e| SecAggError::Peer(format!("shares from `{}` are malformed: {e}", s.from)))?;
            if used != plaintext.len() || pair.round != round || pair.from != j || pair.to != self.me {
                return Err(SecAggError::Peer(format!("shares from `{}` are for another round or pair", s.from)));
            }
            if held.insert(j, (pair.seed.clone(), pair.key.clone())).is_some() {
                return Err(SecAggError::Server(format!("forwarded the shares of `{}` twice", s.from)));
            }
        }
        let t = self.setup.params.threshold;
        if held.len() < t {
            return Err(SecAggError::Abort(format!("only {} neighbours shared keys, {t} are needed", held.len())));
        }
        let mut values = input.to_vec();
        crypto::apply_mask(&mut values, self_seed, bits, true);
        for &j in held.keys() {
            let seed = self
                .mask
                .agree(&peers[&j].mask_pk, &[b"mask", &pairwise_info(round, self.me, j).concat()])
                .map_err(|e| SecAggError::Peer(format!("`{}`: {e}", self.setup.cohort[j])))?;
            crypto::apply_mask(&mut values, &seed, bits, self.me < j);
        }
        self.phase = Phase::MaskedSent { held };
        Ok(MaskedInput { values })
    }

    /// Phase 4: returns the shares the server may have: a survivor's self-mask share or a
    /// dropped client's key share, never both for one peer.
    pub fn handle_unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskReply, SecAggError> {
        let Phase::MaskedSent { held } = &self.phase else {
            return Err(SecAggError::Phase("unmask request", self.phase.name()));
        };
        let survivors: BTreeSet<&str> = request.survivors.iter().map(String::as_str).collect();
        let dropped: BTreeSet<&str> = request.dropped.iter().map(String::as_str).collect();
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::Server(format!(
                "asked for both the self-mask share and the key share of `{both}`; refusing"
            )));
        }
        if !survivors.contains(self.setup.cohort[self.me].as_str()) {
            return Err(SecAggError::Server("this client is not among the survivors it is asked to unmask".into()));
        }
        let t = self.setup.params.threshold;
        if survivors.len() < t {
            return Err(SecAggError::Abort(format!("only {} survivors, {t} are needed", survivors.len())));
        }
        let mut reply = UnmaskReply { seed_shares: Vec::new(), key_shares: Vec::new() };
        for (&j, (seed, key)) in held {
            let id = &self.setup.cohort[j];
            if survivors.contains(id.as_str()) {
                reply.seed_shares.push((id.clone(), seed.clone()));
            } else if dropped.contains(id.as_str()) {
                reply.key_shares.push((id.clone(), key.clone()));
            }
        }
        self.phase = Phase::Done;
        Ok(reply)
    }
}

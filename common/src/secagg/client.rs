//! The client's side of SecAgg+: one value per session, moved through the six phases.

use std::collections::{BTreeMap, BTreeSet};

use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{self, KeyPair, Secret32};
use super::graph;
use super::shamir::{self, Share};
use super::{
    advert_message, mask_info, seed_commitment, share_aad, share_commitment, share_key_info, shown, AdvertSigner,
    Confirmation, JoinList, KeyAdvert, MaskedInput, MaskingList, PeerVerifier, SealedShares, SecAggError, SecAggSetup,
    SharedKeys, SurvivorList, UnmaskReply, UnmaskRequest, Weakened,
};

/// A neighbour whose advert checked out, with the keys agreed with it.
struct Peer {
    /// Kept to check its confirmation of the survivor list.
    certificate: Vec<u8>,
    /// The key of the shares this client sends it, and of those it sends this client.
    key_to: Secret32,
    key_from: Secret32,
    /// The seed of the pairwise mask shared with it.
    mask_seed: Secret32,
}

/// What this client holds of a neighbour that sent it shares.
enum Held {
    Valid {
        seed: Share,
        key: Share,
    },
    /// The shares did not open or did not match their commitments: reported, never returned.
    Invalid,
}

/// The plaintext inside a [`SealedShares`].
#[derive(Serialize, Deserialize)]
struct SharePair {
    seed: Share,
    key: Share,
}

/// Where this client's session stands, with what each step keeps.
enum Phase {
    Joined { nonce: [u8; 32] },
    Advertised,
    SharesSent { peers: BTreeMap<usize, Peer> },
    MaskedSent { peers: BTreeMap<usize, Peer>, held: BTreeMap<usize, Held> },
    Confirmed { peers: BTreeMap<usize, Peer>, held: BTreeMap<usize, Held>, survivors: BTreeSet<usize> },
    Done,
}

impl Phase {
    /// The name of the phase the session is in, in the vocabulary of [`super::Phase`].
    fn name(&self) -> &'static str {
        match self {
            Phase::Joined { .. } => super::Phase::Join.name(),
            Phase::Advertised => super::Phase::Advertise.name(),
            Phase::SharesSent { .. } => super::Phase::ShareKeys.name(),
            Phase::MaskedSent { .. } => super::Phase::MaskedInput.name(),
            Phase::Confirmed { .. } => super::Phase::Confirm.name(),
            Phase::Done => "done",
        }
    }
}

pub struct SecAggClient {
    setup: SecAggSetup,
    /// Known once the cohort has joined (phase 0); zero before.
    session: [u8; 32],
    me: usize,
    /// The session's graph, and this client's neighbours in it.
    graph: Vec<Vec<usize>>,
    neighbours: BTreeSet<usize>,
    cipher: KeyPair,
    mask: KeyPair,
    /// The self-mask seed; gone once the input is masked.
    self_seed: Option<Secret32>,
    phase: Phase,
    weakened: Weakened,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggClient")
            .field("round", &self.setup.round)
            .field("purpose", &self.setup.purpose)
            .field("me", &self.me)
            .field("phase", &self.phase.name())
            .finish_non_exhaustive()
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<4096>()
}

impl SecAggClient {
    /// Phase 0: checks the setup and draws this client's nonce for the session id.
    pub fn join(me: &str, setup: SecAggSetup, rng: &mut impl CryptoRng) -> Result<(Self, [u8; 32]), SecAggError> {
        Self::start(me, setup, rng, Weakened::default())
    }

    /// [`Self::join`] with protections switched off, for the attack tests: only test builds can
    /// reach a client that is not at full strength.
    #[cfg(test)]
    pub(crate) fn join_weakened(
        me: &str,
        setup: SecAggSetup,
        rng: &mut impl CryptoRng,
        weakened: Weakened,
    ) -> Result<(Self, [u8; 32]), SecAggError> {
        Self::start(me, setup, rng, weakened)
    }

    fn start(
        me: &str,
        setup: SecAggSetup,
        rng: &mut impl CryptoRng,
        weakened: Weakened,
    ) -> Result<(Self, [u8; 32]), SecAggError> {
        setup.check()?;
        let index =
            setup.index_of(me).ok_or_else(|| SecAggError::Server(format!("`{me}` is not in the session's cohort")))?;
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let client = Self {
            setup,
            session: [0; 32],
            me: index,
            graph: Vec::new(),
            neighbours: BTreeSet::new(),
            cipher: KeyPair::generate(rng),
            mask: KeyPair::generate(rng),
            self_seed: None,
            phase: Phase::Joined { nonce },
            weakened,
        };
        Ok((client, nonce))
    }

    /// Phase 1: checks the join list (sorted cohort members, each once, this client with its own
    /// nonce), fixes the session id and the graph, and makes the signed advertisement.
    pub fn handle_joined(
        &mut self,
        list: &JoinList,
        signer: &dyn AdvertSigner,
        rng: &mut impl CryptoRng,
    ) -> Result<KeyAdvert, SecAggError> {
        let Phase::Joined { nonce } = self.phase else {
            return Err(SecAggError::Phase("a join list", self.phase.name()));
        };
        let indices = self
            .setup
            .sorted_indices(list.joined.iter().map(|j| j.client.as_str()))
            .map_err(|e| SecAggError::Server(format!("the join list: {e}")))?;
        let mine = indices.iter().zip(&list.joined).any(|(&i, joined)| i == self.me && joined.nonce == nonce);
        if !mine {
            return Err(SecAggError::Server(
                "the join list does not hold this client's nonce: it would be a session this client did not join"
                    .into(),
            ));
        }
        self.session = self.setup.session_under(list, self.weakened);
        self.graph = self.setup.neighbours(&self.session);
        self.neighbours = self.graph[self.me].iter().copied().collect();
        let mut self_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut self_seed[..]);
        let mut advert = KeyAdvert {
            client: self.id(self.me).to_string(),
            cipher_pk: self.cipher.public(),
            mask_pk: self.mask.public(),
            seed_commitment: seed_commitment(&self.session, self.me, &self_seed),
            certificate: signer.certificate(),
            signature: Vec::new(),
        };
        let message = advert_message(&self.setup, &self.session, &advert, self.weakened);
        advert.signature = signer.sign(&message).map_err(SecAggError::Sign)?;
        self.self_seed = Some(self_seed);
        self.phase = Phase::Advertised;
        Ok(advert)
    }

    pub fn round(&self) -> u64 {
        self.setup.round
    }

    pub fn setup(&self) -> &SecAggSetup {
        &self.setup
    }

    /// This client's cipher and mask key pairs: what it brings when it colludes with the server.
    #[cfg(test)]
    pub(crate) fn own_keys(&self) -> (KeyPair, KeyPair) {
        (KeyPair::from_secret(&self.cipher.secret_bytes()), KeyPair::from_secret(&self.mask.secret_bytes()))
    }

    fn index_of(&self, id: &str) -> Result<usize, SecAggError> {
        self.setup.index_of(id).ok_or_else(|| SecAggError::Server(format!("{} is not in the cohort", shown(id))))
    }

    fn id(&self, i: usize) -> &str {
        &self.setup.cohort[i]
    }

    /// Checks one neighbour's advert and agrees this session's keys with it.
    fn check_peer(&self, j: usize, advert: &KeyAdvert, verifier: &dyn PeerVerifier) -> Result<Peer, String> {
        let message = advert_message(&self.setup, &self.session, advert, self.weakened);
        verifier.verify(&advert.client, &advert.certificate, &message, &advert.signature).map_err(|e| e.to_string())?;
        let agree =
            |pair: &KeyPair, pk: &[u8; 32], info: Vec<u8>| pair.agree(pk, &[&info[..]]).map_err(|e| e.to_string());
        Ok(Peer {
            certificate: advert.certificate.clone(),
            key_to: agree(&self.cipher, &advert.cipher_pk, share_key_info(&self.session, self.me, j, self.weakened))?,
            key_from: agree(&self.cipher, &advert.cipher_pk, share_key_info(&self.session, j, self.me, self.weakened))?,
            mask_seed: agree(&self.mask, &advert.mask_pk, mask_info(&self.session, self.me, j))?,
        })
    }

    /// Phase 2: checks the neighbours' adverts, then shares this client's secrets with those
    /// whose adverts checked out. A neighbour whose advert fails is left out of this client's
    /// session (and named in [`SharedKeys::refused`]); the session goes on while at least t
    /// neighbours remain.
    pub fn handle_adverts(
        &mut self,
        adverts: &[KeyAdvert],
        verifier: &dyn PeerVerifier,
        rng: &mut impl CryptoRng,
    ) -> Result<SharedKeys, SecAggError> {
        if !matches!(self.phase, Phase::Advertised) {
            return Err(SecAggError::Phase("key adverts", self.phase.name()));
        }
        let mut peers = BTreeMap::new();
        let mut refused = Vec::new();
        let mut seen = BTreeSet::new();
        for advert in adverts {
            let j = self.index_of(&advert.client)?;
            if !self.neighbours.contains(&j) {
                return Err(SecAggError::Server(format!(
                    "sent the advert of `{}`, who is not a neighbour",
                    advert.client
                )));
            }
            if !seen.insert(j) {
                return Err(SecAggError::Server(format!("sent the advert of `{}` twice", advert.client)));
            }
            match self.check_peer(j, advert, verifier) {
                Ok(peer) => {
                    peers.insert(j, peer);
                }
                Err(e) if self.weakened.abort_on_bad_advert => {
                    return Err(SecAggError::Server(format!(
                        "the key advert of `{}` does not verify ({e}); keys may have been substituted, aborting",
                        advert.client
                    )))
                }
                Err(_) => refused.push(advert.client.clone()),
            }
        }
        let t = self.setup.params.threshold;
        if peers.len() < t {
            return Err(SecAggError::Abort(format!(
                "only {} neighbours advertised valid keys, {t} are needed",
                peers.len()
            )));
        }
        let self_seed = self.self_seed.as_ref().expect("the seed is kept until the input is masked");
        let seed_shares =
            shamir::split(&self_seed[..], t, peers.len(), rng).map_err(|e| SecAggError::Config(e.to_string()))?;
        let key_shares = shamir::split(&self.mask.secret_bytes()[..], t, peers.len(), rng)
            .map_err(|e| SecAggError::Config(e.to_string()))?;
        let mut sealed = Vec::with_capacity(peers.len());
        for ((&j, peer), (seed, key)) in peers.iter().zip(seed_shares.into_iter().zip(key_shares)) {
            let seed_commitment = share_commitment(&self.session, "seed", self.me, j, &seed);
            let key_commitment = share_commitment(&self.session, "key", self.me, j, &key);
            let plaintext = Zeroizing::new(
                bincode::serde::encode_to_vec(&SharePair { seed, key }, bincode_config())
                    .map_err(|e| SecAggError::Config(e.to_string()))?,
            );
            sealed.push(SealedShares {
                from: self.id(self.me).to_string(),
                to: self.id(j).to_string(),
                ciphertext: crypto::seal(&peer.key_to, &share_aad(&self.session, self.me, j), &plaintext),
                seed_commitment,
                key_commitment,
            });
        }
        self.phase = Phase::SharesSent { peers };
        Ok(SharedKeys { sealed, refused })
    }

    /// Opens the shares neighbour `j` sealed for this client and checks them against their
    /// commitments; `None` when anything is wrong.
    fn open(&self, j: usize, peer: &Peer, s: &SealedShares) -> Option<(Share, Share)> {
        let plaintext = crypto::open(&peer.key_from, &share_aad(&self.session, j, self.me), &s.ciphertext).ok()?;
        let (pair, used): (SharePair, usize) = bincode::serde::decode_from_slice(&plaintext, bincode_config()).ok()?;
        let well_formed = |share: &Share| share.x != 0 && share.y.len() == 32;
        let matches = used == plaintext.len()
            && well_formed(&pair.seed)
            && well_formed(&pair.key)
            && (self.weakened.hold_unchecked_shares
                || share_commitment(&self.session, "seed", j, self.me, &pair.seed) == s.seed_commitment
                    && share_commitment(&self.session, "key", j, self.me, &pair.key) == s.key_commitment);
        matches.then(|| (pair.seed.clone(), pair.key.clone()))
    }

    /// Phase 3: opens the shares sent to this client and masks `input` (already quantized).
    /// It masks against every neighbour with whom it exchanged shares (both sent), whether or
    /// not that neighbour's shares opened, so both ends of an edge always agree; a neighbour
    /// whose shares were bad is named in [`MaskedInput::invalid_shares_from`]. The list of whom
    /// it masked against goes with the input, signed.
    pub fn handle_shares(
        &mut self,
        sealed: &[SealedShares],
        input: &[u64],
        signer: &dyn AdvertSigner,
    ) -> Result<MaskedInput, SecAggError> {
        let Phase::SharesSent { peers } = &self.phase else {
            return Err(SecAggError::Phase("sealed shares", self.phase.name()));
        };
        let bits = self.setup.params.quantizer.bits;
        let modmask = crypto::modulus_mask(bits);
        if input.len() != self.setup.vector_len || input.iter().any(|v| *v > modmask) {
            return Err(SecAggError::Config(format!(
                "the input must be {} values below 2^{bits}",
                self.setup.vector_len
            )));
        }
        let mut held = BTreeMap::new();
        let mut invalid_shares_from = Vec::new();
        for s in sealed {
            let j = self.index_of(&s.from)?;
            if s.to != self.id(self.me) {
                return Err(SecAggError::Server(format!("forwarded shares meant for {}", shown(&s.to))));
            }
            // Shares from a neighbour this client left out (its advert failed): ignored, and no
            // mask with it (it did not receive this client's shares either).
            let Some(peer) = peers.get(&j) else { continue };
            if held.contains_key(&j) {
                return Err(SecAggError::Server(format!("forwarded the shares of `{}` twice", s.from)));
            }
            match self.open(j, peer, s) {
                Some((seed, key)) => held.insert(j, Held::Valid { seed, key }),
                None => {
                    invalid_shares_from.push(s.from.clone());
                    held.insert(j, Held::Invalid)
                }
            };
        }
        let t = self.setup.params.threshold;
        if held.len() < t {
            return Err(SecAggError::Abort(format!("only {} neighbours shared keys, {t} are needed", held.len())));
        }
        let masked_with: Vec<usize> = held.keys().copied().collect();
        let signature = signer
            .sign(&MaskingList::signed_message(&self.session, self.me, &masked_with))
            .map_err(SecAggError::Sign)?;
        let mut values = input.to_vec();
        let self_seed = self.self_seed.take().expect("the seed is kept until the input is masked");
        crypto::apply_mask(&mut values, &self_seed, bits, true);
        for &j in held.keys() {
            crypto::apply_mask(&mut values, &peers[&j].mask_seed, bits, self.me < j);
        }
        let masking = MaskingList {
            client: self.id(self.me).to_string(),
            masked_with: masked_with.iter().map(|&j| self.id(j).to_string()).collect(),
            signature,
        };
        let Phase::SharesSent { peers } = std::mem::replace(&mut self.phase, Phase::Done) else {
            unreachable!("checked above")
        };
        self.phase = Phase::MaskedSent { peers, held };
        Ok(MaskedInput { values, invalid_shares_from, masking })
    }

    /// Phase 4: checks the survivor list and signs it. The list must be sorted cohort members
    /// without repeats, include this client, and hold at least `min_inputs` (and t) clients.
    pub fn handle_survivors(&mut self, list: &SurvivorList, signer: &dyn AdvertSigner) -> Result<Vec<u8>, SecAggError> {
        let again = self.weakened.answer_twice && matches!(self.phase, Phase::Confirmed { .. });
        if !matches!(self.phase, Phase::MaskedSent { .. }) && !again {
            return Err(SecAggError::Phase("a survivor list", self.phase.name()));
        }
        let survivors = self
            .setup
            .sorted_indices(list.survivors.iter().map(String::as_str))
            .map_err(|e| SecAggError::Server(format!("the survivor list: {e}; refusing it")))?;
        if !survivors.contains(&self.me) {
            return Err(SecAggError::Server("this client is not among the survivors it is asked to confirm".into()));
        }
        let needed = self.setup.min_inputs.max(self.setup.params.threshold);
        if survivors.len() < needed {
            return Err(SecAggError::Abort(format!(
                "the survivor list holds {} clients; this client helps unmask no sum of fewer than {needed}",
                survivors.len()
            )));
        }
        let signature =
            signer.sign(&SurvivorList::signed_message(&self.session, &survivors)).map_err(SecAggError::Sign)?;
        let (Phase::MaskedSent { peers, held } | Phase::Confirmed { peers, held, .. }) =
            std::mem::replace(&mut self.phase, Phase::Done)
        else {
            unreachable!("checked above")
        };
        self.phase = Phase::Confirmed { peers, held, survivors: survivors.into_iter().collect() };
        Ok(signature)
    }

    /// Phase 5: returns the shares the server may have (a survivor's self-mask share or a dropped
    /// neighbour's key share, never both for one peer), once the request shows that
    ///
    /// - a quorum of the session's committee confirmed exactly the survivor list this client
    ///   signed (so no other list can have been accepted anywhere),
    /// - every survivor whose seed share it returns masked against all of its surviving
    ///   neighbours (its signed masking list), so no group was cut off by withheld shares,
    /// - and every connected part of the graph among the survivors holds at least `min_inputs`
    ///   clients, so no part's sum can be unmasked on its own.
    pub fn handle_unmask(
        &mut self,
        request: &UnmaskRequest,
        verifier: &dyn PeerVerifier,
    ) -> Result<UnmaskReply, SecAggError> {
        let Phase::Confirmed { peers, held, survivors } = &self.phase else {
            return Err(SecAggError::Phase("an unmask request", self.phase.name()));
        };
        let refuse = |why: String| Err(SecAggError::Abort(format!("{why}; revealing nothing")));
        let ordered: Vec<usize> = survivors.iter().copied().collect();
        let message = SurvivorList::signed_message(&self.session, &ordered);
        let (signers, needed): (BTreeSet<usize>, usize) = if self.weakened.neighbourhood_consistency {
            (self.neighbours.clone(), self.setup.params.threshold)
        } else {
            let committee = self.setup.committee(&self.session);
            let quorum = self.setup.quorum(committee.len());
            (committee.into_iter().collect(), quorum)
        };
        let mut confirmed = BTreeSet::new();
        // At most one signature per signer is checked, and no more than the quorum: a long or
        // padded list costs nothing more.
        for Confirmation { client, certificate, signature } in request.confirmations.iter().take(2 * signers.len()) {
            if confirmed.len() >= needed {
                break;
            }
            let Some(j) = self.setup.index_of(client) else { continue };
            if confirmed.contains(&j) || !signers.contains(&j) || !survivors.contains(&j) {
                continue;
            }
            if verifier.verify(client, certificate, &message, signature).is_ok() {
                confirmed.insert(j);
            }
        }
        let result = if confirmed.len() < needed && !self.weakened.skip_consistency_check {
            refuse(format!(
                "only {} of the session's committee confirmed the survivor list this client signed, {needed} are \
                 needed (they dropped, or the server showed clients different lists)",
                confirmed.len()
            ))
        } else if self.weakened.skip_masking_check {
            Ok(())
        } else {
            self.check_masking(request, peers, held, survivors, verifier).or_else(refuse)
        };
        let reply = result.map(|()| {
            let mut reply = UnmaskReply { seed_shares: Vec::new(), key_shares: Vec::new() };
            for (&j, h) in held {
                let Held::Valid { seed, key } = h else { continue };
                let id = self.id(j).to_string();
                if survivors.contains(&j) {
                    reply.seed_shares.push((id, seed.clone()));
                } else {
                    reply.key_shares.push((id, key.clone()));
                }
            }
            reply
        });
        if !self.weakened.answer_twice {
            self.phase = Phase::Done;
        }
        reply
    }

    /// The two checks against unmasking a small group: each survivor whose seed share this client
    /// holds masked against all its surviving neighbours, and no part of the survivors' graph is
    /// smaller than `min_inputs`.
    fn check_masking(
        &self,
        request: &UnmaskRequest,
        peers: &BTreeMap<usize, Peer>,
        held: &BTreeMap<usize, Held>,
        survivors: &BTreeSet<usize>,
        verifier: &dyn PeerVerifier,
    ) -> Result<(), String> {
        let parts = graph::part_sizes(&self.graph, survivors);
        if let Some(small) = parts.iter().filter(|&&size| size < self.setup.min_inputs).min() {
            return Err(format!(
                "the survivors' graph falls apart into {} parts, one of {small} clients (fewer than {})",
                parts.len(),
                self.setup.min_inputs
            ));
        }
        for (&j, h) in held {
            if !survivors.contains(&j) || !matches!(h, Held::Valid { .. }) {
                continue;
            }
            let id = self.id(j);
            let Some(list) = request.masking.iter().find(|m| m.client == id) else {
                return Err(format!("the request lacks survivor `{id}`'s list of whom it masked against"));
            };
            let masked_with = self
                .setup
                .sorted_indices(list.masked_with.iter().map(String::as_str))
                .map_err(|e| format!("`{id}`'s masking list: {e}"))?;
            let message = MaskingList::signed_message(&self.session, j, &masked_with);
            if let Err(e) = verifier.verify_signature(&peers[&j].certificate, &message, &list.signature) {
                return Err(format!("`{id}`'s masking list does not verify ({e})"));
            }
            let cut_off: Vec<&str> = self.graph[j]
                .iter()
                .filter(|m| survivors.contains(m) && masked_with.binary_search(m).is_err())
                .map(|&m| self.id(m))
                .collect();
            if !cut_off.is_empty() {
                return Err(format!(
                    "survivor `{id}` did not mask against its surviving neighbours {cut_off:?} (shares withheld)"
                ));
            }
        }
        Ok(())
    }
}

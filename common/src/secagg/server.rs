//! The server's side of SecAgg+: gathers the join list, routes keys, shares, masking lists and
//! confirmations, sums masked inputs as they arrive (it never holds one on its own), checks
//! every share a client returns against the commitment its dealer made, and removes the masks at
//! the end.

use std::collections::{BTreeMap, BTreeSet};

use super::crypto::{self, KeyPair};
use super::shamir::{self, Share};
use super::{
    advert_message, mask_info, seed_commitment, share_commitment, shown, Confirmation, JoinList, Joined, KeyAdvert,
    MaskedInput, MaskingList, PeerVerifier, Phase, Rejection, SealedShares, SecAggError, SecAggSetup, SharedKeys,
    SurvivorList, UnmaskReply, UnmaskRequest, Weakened,
};
use crate::peer::ClientId;

/// The commitments of the pair of shares one client dealt another.
#[derive(Clone, Copy)]
struct Dealt {
    seed: [u8; 32],
    key: [u8; 32],
}

/// What a finished session gives: the sum of the survivors' inputs, who they are, and the
/// clients caught cheating (named with what they did; their bad shares were not used).
#[derive(Debug, Clone, PartialEq)]
pub struct Unmasked {
    pub sum: Vec<u64>,
    pub survivors: Vec<ClientId>,
    pub cheaters: Vec<(ClientId, String)>,
}

pub struct SecAggServer {
    setup: SecAggSetup,
    /// Who joined with which nonce (phase 0).
    joined: BTreeMap<usize, [u8; 32]>,
    /// Known once the joins close; zero before.
    session: [u8; 32],
    graph: Vec<Vec<usize>>,
    /// `None` once finished (or aborted).
    phase: Option<Phase>,
    adverts: BTreeMap<usize, KeyAdvert>,
    /// Shares from each sender (U2 = the keys), until they are routed.
    outgoing: BTreeMap<usize, Vec<SealedShares>>,
    /// `(dealer, holder)`: the commitments of the shares the dealer sent the holder.
    dealt: BTreeMap<(usize, usize), Dealt>,
    /// The running sum of masked inputs; individual inputs are never kept.
    masked_sum: Vec<u64>,
    /// U3: the clients whose masked input is in the sum.
    survivors: BTreeSet<usize>,
    /// Each survivor's signed list of whom it masked against.
    masking: BTreeMap<usize, MaskingList>,
    /// `(holder, dealer)`: shares a holder reported as bad when it opened them.
    complaints: BTreeSet<(usize, usize)>,
    /// `(client, neighbour)`: adverts a client refused.
    refusals: BTreeSet<(usize, usize)>,
    confirmations: BTreeMap<usize, Vec<u8>>,
    seed_shares: BTreeMap<usize, Vec<Share>>,
    key_shares: BTreeMap<usize, Vec<Share>>,
    responded: BTreeSet<usize>,
    cheaters: BTreeMap<usize, String>,
    weakened: Weakened,
}

impl std::fmt::Debug for SecAggServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggServer")
            .field("round", &self.setup.round)
            .field("purpose", &self.setup.purpose)
            .field("phase", &self.phase.map_or("done", Phase::name))
            .field("cohort", &self.setup.cohort.len())
            .finish_non_exhaustive()
    }
}

impl SecAggServer {
    /// Checks the setup (refusing settings that cannot give the sum) and starts phase 1.
    pub fn new(setup: SecAggSetup) -> Result<Self, SecAggError> {
        setup.check()?;
        let len = setup.vector_len;
        Ok(Self {
            setup,
            joined: BTreeMap::new(),
            session: [0; 32],
            graph: Vec::new(),
            phase: Some(Phase::Join),
            adverts: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            dealt: BTreeMap::new(),
            masked_sum: vec![0; len],
            survivors: BTreeSet::new(),
            masking: BTreeMap::new(),
            complaints: BTreeSet::new(),
            refusals: BTreeSet::new(),
            confirmations: BTreeMap::new(),
            seed_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
            responded: BTreeSet::new(),
            cheaters: BTreeMap::new(),
            weakened: Weakened::default(),
        })
    }

    #[cfg(test)]
    pub(crate) fn weaken(&mut self, weakened: Weakened) {
        self.weakened = weakened;
    }

    pub fn setup(&self) -> &SecAggSetup {
        &self.setup
    }

    fn index(&self, id: &str) -> Result<usize, SecAggError> {
        self.setup
            .index_of(id)
            .ok_or_else(|| SecAggError::Peer(format!("{} is not in this session's cohort", shown(id))))
    }

    fn id(&self, i: usize) -> &str {
        &self.setup.cohort[i]
    }

    fn expect(&self, phase: Phase, what: &'static str) -> Result<(), SecAggError> {
        if self.phase == Some(phase) {
            Ok(())
        } else {
            Err(SecAggError::Phase(what, self.phase.map_or("done", Phase::name)))
        }
    }

    fn abort(&mut self, why: String) -> SecAggError {
        self.phase = None;
        SecAggError::Abort(why)
    }

    fn cheated(&mut self, i: usize, what: String) -> SecAggError {
        self.cheaters.entry(i).or_insert_with(|| what.clone());
        SecAggError::Cheater { client: self.setup.cohort[i].clone(), what }
    }

    /// Clients caught cheating so far, with what they did.
    pub fn cheaters(&self) -> Vec<(ClientId, String)> {
        self.cheaters.iter().map(|(&i, what)| (self.id(i).to_string(), what.clone())).collect()
    }

    /// Adverts that clients refused, as `(client, neighbour)`: a neighbour refused by every
    /// client that saw it probably sent a bad advert; one refused by a single client may have
    /// been tampered with on the way.
    pub fn refusals(&self) -> Vec<(ClientId, ClientId)> {
        self.refusals.iter().map(|&(i, j)| (self.id(i).to_string(), self.id(j).to_string())).collect()
    }

    /// Shares reported bad by their holders, as `(holder, dealer)`.
    pub fn complaints(&self) -> Vec<(ClientId, ClientId)> {
        self.complaints.iter().map(|&(h, d)| (self.id(h).to_string(), self.id(d).to_string())).collect()
    }

    /// Phase 0: a client's nonce.
    pub fn handle_join(&mut self, from: &str, nonce: [u8; 32]) -> Result<(), SecAggError> {
        self.expect(Phase::Join, "a join")?;
        let i = self.index(from)?;
        if self.joined.insert(i, nonce).is_some() {
            return Err(SecAggError::Peer(format!("`{from}` joined twice")));
        }
        Ok(())
    }

    /// Ends phase 0: the join list (the same for everybody), which fixes the session id and the
    /// graph.
    pub fn close_joins(&mut self) -> Result<JoinList, SecAggError> {
        self.expect(Phase::Join, "closing the joins")?;
        let t = self.setup.params.threshold;
        if self.joined.len() < t + 1 {
            let n = self.joined.len();
            return Err(self.abort(format!("{n} clients joined; at least {} are needed", t + 1)));
        }
        let joined = self.joined.iter().map(|(&i, nonce)| Joined { client: self.id(i).to_string(), nonce: *nonce });
        let list = JoinList { joined: joined.collect() };
        self.session = self.setup.session_under(&list, self.weakened);
        self.graph = self.setup.neighbours(&self.session);
        self.phase = Some(Phase::Advertise);
        Ok(list)
    }

    /// The session id (known once the joins are closed).
    pub fn session_id(&self) -> [u8; 32] {
        self.session
    }

    /// Phase 1: takes a client's advert. The server checks the signature against the CA too: a
    /// client whose advert does not verify under a valid certificate, or that advertises a
    /// low-order key, is named as a cheater and left out; one whose certificate is not valid
    /// (expired, another CA's) is left out.
    pub fn handle_advert(
        &mut self,
        from: &str,
        advert: KeyAdvert,
        verifier: &dyn PeerVerifier,
    ) -> Result<(), SecAggError> {
        self.expect(Phase::Advertise, "a key advert")?;
        let i = self.index(from)?;
        if advert.client != from {
            return Err(SecAggError::Peer(format!("`{from}` sent an advert in the name of {}", shown(&advert.client))));
        }
        if advert.certificate.len() > 16 << 10 || advert.signature.len() > 1024 {
            return Err(SecAggError::Peer(format!("`{from}` sent an oversized advert")));
        }
        if self.adverts.contains_key(&i) {
            return Err(SecAggError::Peer(format!("`{from}` advertised twice")));
        }
        if !self.joined.contains_key(&i) {
            return Err(SecAggError::Peer(format!("`{from}` advertised keys without joining")));
        }
        let message = advert_message(&self.setup, &self.session, &advert, self.weakened);
        match verifier.verify(from, &advert.certificate, &message, &advert.signature) {
            Ok(()) => {}
            Err(Rejection::Certificate(e)) => {
                return Err(SecAggError::Peer(format!("`{from}`'s certificate is not accepted ({e}); left out")))
            }
            Err(Rejection::Signature(e)) => {
                return Err(self.cheated(i, format!("its key advert does not verify ({e})")))
            }
        }
        // A low-order point gives no shared secret with anyone: refused by every neighbour.
        let probe = KeyPair::from_secret(&[7; 32]);
        if [advert.cipher_pk, advert.mask_pk].iter().any(|pk| probe.agree(pk, &[b"probe"]).is_err()) {
            return Err(self.cheated(i, "it advertised a low-order public key".into()));
        }
        self.adverts.insert(i, advert);
        Ok(())
    }

    /// Ends phase 1: for each client that advertised, its neighbours' adverts.
    pub fn close_adverts(&mut self) -> Result<BTreeMap<String, Vec<KeyAdvert>>, SecAggError> {
        self.expect(Phase::Advertise, "closing the adverts")?;
        let t = self.setup.params.threshold;
        if self.adverts.len() < t + 1 {
            let n = self.adverts.len();
            return Err(self.abort(format!("{n} clients advertised valid keys; at least {} are needed", t + 1)));
        }
        self.phase = Some(Phase::ShareKeys);
        Ok(self
            .adverts
            .keys()
            .map(|&i| {
                let theirs = self.graph[i].iter().filter_map(|j| self.adverts.get(j).cloned()).collect();
                (self.id(i).to_string(), theirs)
            })
            .collect())
    }

    /// Phase 2: takes a client's sealed shares (checking their addresses) and its refusals.
    pub fn handle_shares(&mut self, from: &str, keys: SharedKeys) -> Result<(), SecAggError> {
        self.expect(Phase::ShareKeys, "sealed shares")?;
        let i = self.index(from)?;
        if !self.adverts.contains_key(&i) {
            return Err(SecAggError::Peer(format!("`{from}` sent shares without advertising keys")));
        }
        if self.outgoing.contains_key(&i) {
            return Err(SecAggError::Peer(format!("`{from}` sent shares twice")));
        }
        let mut seen = BTreeSet::new();
        for s in &keys.sealed {
            let j = self.index(&s.to)?;
            if s.from != from || !self.graph[i].contains(&j) || !self.adverts.contains_key(&j) || !seen.insert(j) {
                return Err(SecAggError::Peer(format!("`{from}` sent shares addressed wrongly (to `{}`)", s.to)));
            }
            if s.ciphertext.len() > 1024 {
                return Err(SecAggError::Peer(format!("`{from}` sent an oversized share")));
            }
        }
        let mut refused = BTreeSet::new();
        for id in &keys.refused {
            let j = self.index(id)?;
            if !self.graph[i].contains(&j) || seen.contains(&j) || !refused.insert(j) {
                return Err(SecAggError::Peer(format!("`{from}` refused the advert of `{id}`, which it was not sent")));
            }
        }
        for s in &keys.sealed {
            let j = self.index(&s.to)?;
            self.dealt.insert((i, j), Dealt { seed: s.seed_commitment, key: s.key_commitment });
        }
        self.refusals.extend(refused.into_iter().map(|j| (i, j)));
        self.outgoing.insert(i, keys.sealed);
        Ok(())
    }

    /// Ends phase 2: for each client that sent shares, the shares addressed to it by the
    /// others that did (U2).
    pub fn close_shares(&mut self) -> Result<BTreeMap<String, Vec<SealedShares>>, SecAggError> {
        self.expect(Phase::ShareKeys, "closing the shares")?;
        let t = self.setup.params.threshold;
        if self.outgoing.len() < t + 1 {
            let n = self.outgoing.len();
            return Err(self.abort(format!("{n} clients shared keys; at least {} are needed", t + 1)));
        }
        // A client that did not deal shares to a neighbour that dealt to it (it refused an advert
        // this server had verified: a clock off, a certificate expiring, or a lie) would survive
        // with no mask between the two, and every neighbour's masking check would then refuse to
        // reveal: one refusal would cost the round. So one of the two is left out now, its
        // shares not routed: the refused client when at least t of its neighbours refused it
        // (fewer than t colluders cannot push an honest client out), else the refuser. Repeated
        // until every edge is mutual.
        loop {
            let refused_by = |j: usize| {
                self.graph[j]
                    .iter()
                    .filter(|&&i| self.outgoing.contains_key(&i) && !self.dealt.contains_key(&(i, j)))
                    .count()
            };
            let mut leave = BTreeSet::new();
            for &i in self.outgoing.keys() {
                for &j in &self.graph[i] {
                    let one_way = self.dealt.contains_key(&(j, i)) && !self.dealt.contains_key(&(i, j));
                    if self.outgoing.contains_key(&j) && one_way {
                        leave.insert(if refused_by(j) >= t { j } else { i });
                    }
                }
            }
            if leave.is_empty() || self.weakened.route_one_way_edges {
                break;
            }
            for i in leave {
                self.outgoing.remove(&i);
                self.dealt.retain(|&(a, b), _| a != i && b != i);
            }
        }
        if self.outgoing.len() < t + 1 {
            let n = self.outgoing.len();
            return Err(self.abort(format!("{n} clients shared keys both ways; at least {} are needed", t + 1)));
        }
        let mut inbox: BTreeMap<String, Vec<SealedShares>> =
            self.outgoing.keys().map(|&i| (self.id(i).to_string(), Vec::new())).collect();
        for sealed in std::mem::take(&mut self.outgoing).into_values() {
            for s in sealed {
                if let Some(box_) = inbox.get_mut(&s.to) {
                    box_.push(s);
                }
            }
        }
        self.phase = Some(Phase::MaskedInput);
        Ok(inbox)
    }

    /// U2: the clients that sent shares.
    fn shared(&self, i: usize) -> bool {
        self.dealt.range((i, 0)..(i + 1, 0)).next().is_some()
    }

    /// Whether `a` and `b` masked against each other: both dealt the other shares.
    fn masked_together(&self, a: usize, b: usize) -> bool {
        self.dealt.contains_key(&(a, b)) && self.dealt.contains_key(&(b, a))
    }

    /// Phase 3: adds a masked input to the running sum and notes the holder's complaints and
    /// its signed masking list.
    pub fn handle_masked(
        &mut self,
        from: &str,
        input: MaskedInput,
        verifier: &dyn PeerVerifier,
    ) -> Result<(), SecAggError> {
        self.expect(Phase::MaskedInput, "a masked input")?;
        let i = self.index(from)?;
        if !self.shared(i) {
            return Err(SecAggError::Peer(format!("`{from}` sent a masked input without sharing keys")));
        }
        let modmask = crypto::modulus_mask(self.setup.params.quantizer.bits);
        if input.values.len() != self.setup.vector_len || input.values.iter().any(|v| *v > modmask) {
            return Err(SecAggError::Peer(format!("`{from}` sent a masked input of the wrong length or range")));
        }
        let mut complaints = BTreeSet::new();
        for id in &input.invalid_shares_from {
            let j = self.index(id)?;
            if !self.dealt.contains_key(&(j, i)) || !complaints.insert((i, j)) {
                return Err(SecAggError::Peer(format!("`{from}` complains about shares `{id}` did not send it")));
            }
        }
        if self.survivors.contains(&i) {
            return Err(SecAggError::Peer(format!("`{from}` sent a second masked input")));
        }
        // Its masking list must say what the server routed: both dealt each other shares.
        let routed: Vec<usize> = self.graph[i].iter().copied().filter(|&j| self.masked_together(i, j)).collect();
        let listed: Vec<usize> = input.masking.masked_with.iter().map(|id| self.index(id)).collect::<Result<_, _>>()?;
        if input.masking.client != from || listed != routed {
            return Err(SecAggError::Peer(format!(
                "`{from}`'s list of whom it masked against is not the neighbours it exchanged shares with"
            )));
        }
        let message = MaskingList::signed_message(&self.session, i, &routed);
        let certificate = &self.adverts[&i].certificate;
        if let Err(e) = verifier.verify_signature(certificate, &message, &input.masking.signature) {
            return Err(self.cheated(i, format!("its masking list does not verify ({e})")));
        }
        self.survivors.insert(i);
        self.masking.insert(i, input.masking.clone());
        for (s, v) in self.masked_sum.iter_mut().zip(&input.values) {
            *s = s.wrapping_add(*v) & modmask;
        }
        self.complaints.extend(complaints);
        Ok(())
    }

    /// Ends phase 3: the survivor list (the same for every survivor), if it is long enough.
    pub fn close_masked(&mut self) -> Result<SurvivorList, SecAggError> {
        self.expect(Phase::MaskedInput, "closing the masked inputs")?;
        let needed = self.setup.params.threshold.max(self.setup.min_inputs);
        if self.survivors.len() < needed {
            let n = self.survivors.len();
            return Err(self.abort(format!("{n} clients sent masked inputs; at least {needed} are needed")));
        }
        self.phase = Some(Phase::Confirm);
        Ok(SurvivorList { survivors: self.survivors() })
    }

    /// Phase 4: a survivor's signature over the survivor list.
    pub fn handle_confirmation(
        &mut self,
        from: &str,
        signature: Vec<u8>,
        verifier: &dyn PeerVerifier,
    ) -> Result<(), SecAggError> {
        self.expect(Phase::Confirm, "a confirmation")?;
        let i = self.index(from)?;
        if !self.survivors.contains(&i) || self.confirmations.contains_key(&i) {
            return Err(SecAggError::Peer(format!("`{from}` is not a survivor or confirmed twice")));
        }
        if signature.len() > 1024 {
            return Err(SecAggError::Peer(format!("`{from}` sent an oversized confirmation")));
        }
        let ordered: Vec<usize> = self.survivors.iter().copied().collect();
        let message = SurvivorList::signed_message(&self.session, &ordered);
        // The whole check, as the clients will make it (a certificate can expire mid-round).
        match verifier.verify(from, &self.adverts[&i].certificate, &message, &signature) {
            Ok(()) => {}
            Err(Rejection::Certificate(e)) => {
                return Err(SecAggError::Peer(format!("`{from}`'s certificate is no longer accepted ({e})")))
            }
            Err(Rejection::Signature(e)) => {
                return Err(self.cheated(i, format!("its confirmation of the survivor list does not verify ({e})")))
            }
        }
        self.confirmations.insert(i, signature);
        Ok(())
    }

    /// Ends phase 4: for each survivor that confirmed, the committee's confirmations (the same
    /// for all) and its surviving neighbours' masking lists. Aborts when the committee's quorum
    /// did not confirm: no client would reveal anything.
    pub fn close_confirmations(&mut self) -> Result<BTreeMap<String, UnmaskRequest>, SecAggError> {
        self.expect(Phase::Confirm, "closing the confirmations")?;
        let committee = self.setup.committee(&self.session);
        let quorum = self.setup.quorum(committee.len());
        let confirmations = self.confirmations_of(&committee);
        if confirmations.len() < quorum && !self.weakened.neighbourhood_consistency {
            let n = confirmations.len();
            return Err(self.abort(format!(
                "{n} of the session's committee of {} confirmed the survivor list; {quorum} are needed",
                committee.len()
            )));
        }
        self.phase = Some(Phase::Unmask);
        Ok(self
            .confirmations
            .keys()
            .map(|&i| {
                let confirmations = if self.weakened.neighbourhood_consistency {
                    self.confirmations_of(&self.graph[i])
                } else {
                    confirmations.clone()
                };
                let masking = self.graph[i].iter().filter_map(|j| self.masking.get(j).cloned()).collect();
                (self.id(i).to_string(), UnmaskRequest { confirmations, masking })
            })
            .collect())
    }

    /// The confirmations of those of `signers` who confirmed, with their certificates.
    fn confirmations_of(&self, signers: &[usize]) -> Vec<Confirmation> {
        signers
            .iter()
            .filter_map(|j| {
                self.confirmations.get(j).map(|signature| Confirmation {
                    client: self.id(*j).to_string(),
                    certificate: self.adverts[j].certificate.clone(),
                    signature: signature.clone(),
                })
            })
            .collect()
    }

    /// Phase 5: takes a client's shares. Each must be one the server may have (a survivor's
    /// seed share, a dropped client's key share, dealt to this client) and match the commitment
    /// its dealer made. A bad share names its sender as a cheater and is not used; the reply's
    /// good shares are kept.
    pub fn handle_unmask(&mut self, from: &str, reply: UnmaskReply) -> Result<(), SecAggError> {
        self.expect(Phase::Unmask, "an unmask reply")?;
        let i = self.index(from)?;
        if !self.confirmations.contains_key(&i) || !self.responded.insert(i) {
            return Err(SecAggError::Peer(format!("`{from}` was not asked to unmask or answered twice")));
        }
        let mut owners = BTreeSet::new();
        let mut accepted = Vec::new();
        let mut problem = None;
        for (kind, shares) in [("seed", &reply.seed_shares), ("key", &reply.key_shares)] {
            for (owner, share) in shares {
                let Some(j) = self.setup.index_of(owner) else {
                    problem.get_or_insert(format!("returned a share of {}, who is not in the cohort", shown(owner)));
                    continue;
                };
                let allowed = if kind == "seed" { self.survivors.contains(&j) } else { !self.survivors.contains(&j) };
                let Some(dealt) = self.dealt.get(&(j, i)).filter(|_| allowed && owners.insert(j)) else {
                    problem.get_or_insert(format!("returned a {kind} share of `{owner}` it may not return"));
                    continue;
                };
                let commitment = if kind == "seed" { dealt.seed } else { dealt.key };
                let genuine = share.x != 0
                    && share.y.len() == 32
                    && share_commitment(&self.session, kind, j, i, share) == commitment;
                if genuine || self.weakened.trust_returned_shares {
                    accepted.push((kind, j, share.clone()));
                } else {
                    let what = if kind == "seed" { "self-mask seed" } else { "mask key" };
                    problem.get_or_insert(format!(
                        "returned a share of `{owner}`'s {what} that does not match the commitment `{owner}` made"
                    ));
                }
            }
        }
        for (kind, j, share) in accepted {
            let store = if kind == "seed" { &mut self.seed_shares } else { &mut self.key_shares };
            store.entry(j).or_default().push(share);
        }
        match problem {
            Some(what) => Err(self.cheated(i, what)),
            None => Ok(()),
        }
    }

    /// Clients that sent a masked input: the sum is theirs.
    pub fn survivors(&self) -> Vec<String> {
        self.survivors.iter().map(|&i| self.id(i).to_string()).collect()
    }

    /// Rebuilds a secret from verified shares. When it cannot, it says why and, where the
    /// dealer is to blame, names it: two shares at one point (each matching the dealer's own
    /// commitment), or complaints from more of its neighbours than could all be lying.
    fn rebuild(&mut self, shares: Option<Vec<Share>>, owner: usize, what: &str) -> Result<[u8; 32], SecAggError> {
        let t = self.setup.params.threshold;
        let shares = shares.unwrap_or_default();
        let mut points = BTreeSet::new();
        if shares.iter().any(|s| !points.insert(s.x)) {
            let e = self.cheated(owner, format!("it dealt two neighbours shares of its {what} at the same point"));
            return Err(SecAggError::Abort(e.to_string()));
        }
        if shares.len() < t {
            let complaints = self.complaints.iter().filter(|(_, dealer)| *dealer == owner).count();
            let k = self.setup.effective_degree();
            let why = format!(
                "{} of `{}`'s neighbours returned a valid share of its {what}, {t} are needed",
                shares.len(),
                self.id(owner)
            );
            // Fewer than t colluders could invent k - t + 1 complaints: only t name the dealer.
            if complaints >= t {
                let e = self.cheated(owner, format!("{complaints} of its neighbours report shares that do not open"));
                return Err(SecAggError::Abort(format!("{why}: {e}")));
            }
            if complaints > k - t {
                return Err(SecAggError::Abort(format!(
                    "{why}: {complaints} of its neighbours report its shares do not open (too few to name it)"
                )));
            }
            return Err(SecAggError::Abort(why));
        }
        let secret = shamir::combine(&shares, t).map_err(|e| SecAggError::Abort(e.to_string()))?;
        secret[..]
            .try_into()
            .map_err(|_| SecAggError::Abort(format!("`{}`'s {what} has the wrong size", self.id(owner))))
    }

    /// Removes the masks and returns the sum of the survivors' inputs modulo 2^bits.
    pub fn finish(&mut self) -> Result<Unmasked, SecAggError> {
        self.expect(Phase::Unmask, "finishing")?;
        let bits = self.setup.params.quantizer.bits;
        let mut sum = std::mem::take(&mut self.masked_sum);
        let survivors: Vec<usize> = self.survivors.iter().copied().collect();
        for j in survivors {
            let shares = self.seed_shares.get(&j).cloned();
            let seed = self.rebuild(shares, j, "self-mask seed")?;
            if seed_commitment(&self.session, j, &seed) != self.adverts[&j].seed_commitment
                && !self.weakened.trust_returned_shares
            {
                // Every share was checked against j's own commitments: j dealt them wrongly.
                let what = "its self-mask seed shares do not rebuild the seed it committed to".to_string();
                let e = self.cheated(j, what);
                return Err(SecAggError::Abort(format!("{e}; its input cannot be unmasked")));
            }
            crypto::apply_mask(&mut sum, &seed, bits, false);
        }
        // Dropped clients some survivor masked against: their pairwise masks must come out.
        let dropped: Vec<usize> = self
            .adverts
            .keys()
            .copied()
            .filter(|&j| !self.survivors.contains(&j) && self.survivors.iter().any(|&m| self.masked_together(j, m)))
            .collect();
        for j in dropped {
            let shares = self.key_shares.get(&j).cloned();
            let secret = self.rebuild(shares, j, "mask key")?;
            let key = KeyPair::from_secret(&secret);
            if key.public() != self.adverts[&j].mask_pk {
                let e = self.cheated(j, "its mask key shares do not rebuild the key it advertised".into());
                return Err(SecAggError::Abort(format!("{e}; the masks it shares cannot be removed")));
            }
            // Survivors that exchanged shares with j added a pairwise mask with it: take it out.
            for &m in self.survivors.iter().filter(|&&m| self.masked_together(j, m)) {
                let seed = key
                    .agree(&self.adverts[&m].mask_pk, &[&mask_info(&self.session, m, j)[..]])
                    .map_err(|e| SecAggError::Peer(format!("`{}`: {e}", self.id(m))))?;
                crypto::apply_mask(&mut sum, &seed, bits, m > j);
            }
        }
        self.phase = None;
        // Masks hide any residue, so nobody can check one input's range; but the sum of n
        // in-range inputs lies in [0, n max_code]. A sum outside it holds an out-of-range input
        // (whose sender cannot be told): the round's sum is not used. (A private round wraps by
        // design and is bounded by its fixed denominator instead.)
        let quantizer = &self.setup.params.quantizer;
        let most = (self.survivors.len() as u64).saturating_mul(quantizer.max_code());
        if !quantizer.wrap && !self.weakened.unchecked_sum_range && sum.iter().any(|v| *v > most) {
            return Err(SecAggError::Abort(
                "the sum lies outside what the survivors' in-range inputs can give: a client sent values outside the \
                 quantizer's range (which masking hides); the round's sum is not used"
                    .into(),
            ));
        }
        Ok(Unmasked { sum, survivors: self.survivors(), cheaters: self.cheaters() })
    }
}

//! The server's side of SecAgg+: routes keys and shares, sums masked inputs as they arrive
//! (it never holds one on its own), and removes the masks at the end.

use std::collections::{BTreeMap, BTreeSet};

use super::crypto::{self, KeyPair};
use super::shamir::{self, Share};
use super::{
    pairwise_info, KeyAdvert, MaskedInput, SealedShares, SecAggError, SecAggSetup, UnmaskReply, UnmaskRequest,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Advertise,
    Share,
    Masked,
    Unmask,
    Done,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Advertise => "advertise keys",
            Phase::Share => "share keys",
            Phase::Masked => "masked input",
            Phase::Unmask => "unmask",
            Phase::Done => "done",
        }
    }
}

pub struct SecAggServer {
    setup: SecAggSetup,
    graph: Vec<Vec<usize>>,
    phase: Phase,
    adverts: BTreeMap<usize, KeyAdvert>,
    /// Shares from each sender (U2 = the keys).
    outgoing: BTreeMap<usize, Vec<SealedShares>>,
    /// The running sum of masked inputs; individual inputs are never kept.
    masked_sum: Vec<u64>,
    survivors: BTreeSet<usize>,
    dropped: BTreeSet<usize>,
    seed_shares: BTreeMap<usize, Vec<Share>>,
    key_shares: BTreeMap<usize, Vec<Share>>,
    responded: BTreeSet<usize>,
}

impl std::fmt::Debug for SecAggServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggServer")
            .field("round", &self.setup.round)
            .field("phase", &self.phase.name())
            .field("cohort", &self.setup.cohort.len())
            .finish_non_exhaustive()
    }
}

impl SecAggServer {
    /// Checks the setup (refusing settings that cannot give the sum) and starts phase 1.
    pub fn new(setup: SecAggSetup) -> Result<Self, SecAggError> {
        setup.check()?;
        let graph = setup.neighbours();
        let len = setup.vector_len;
        Ok(Self {
            setup,
            graph,
            phase: Phase::Advertise,
            adverts: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            masked_sum: vec![0; len],
            survivors: BTreeSet::new(),
            dropped: BTreeSet::new(),
            seed_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
            responded: BTreeSet::new(),
        })
    }

    pub fn setup(&self) -> &SecAggSetup {
        &self.setup
    }

    fn index(&self, id: &str) -> Result<usize, SecAggError> {
        self.setup
            .cohort
            .binary_search_by(|c| c.as_str().cmp(id))
            .map_err(|_| SecAggError::Peer(format!("`{id}` is not in this round's cohort")))
    }

    fn expect(&self, phase: Phase, what: &'static str) -> Result<(), SecAggError> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(SecAggError::Phase(what, self.phase.name()))
        }
    }

    fn abort(&mut self, why: String) -> SecAggError {
        self.phase = Phase::Done;
        SecAggError::Abort(why)
    }

    pub fn handle_advert(&mut self, from: &str, advert: KeyAdvert) -> Result<(), SecAggError> {
        self.expect(Phase::Advertise, "a key advert")?;
        let i = self.index(from)?;
        if advert.client != from {
            return Err(SecAggError::Peer(format!("`{from}` sent an advert in the name of `{}`", advert.client)));
        }
        if advert.certificate.len() > 16 << 10 || advert.signature.len() > 1024 {
            return Err(SecAggError::Peer(format!("`{from}` sent an oversized advert")));
        }
        if self.adverts.insert(i, advert).is_some() {
            return Err(SecAggError::Peer(format!("`{from}` advertised twice")));
        }
        Ok(())
    }

    /// Ends phase 1: for each client that advertised, its neighbours' adverts.
    pub fn close_adverts(&mut self) -> Result<BTreeMap<String, Vec<KeyAdvert>>, SecAggError> {
        self.expect(Phase::Advertise, "closing the adverts")?;
        let t = self.setup.params.threshold;
        if self.adverts.len() < t + 1 {
            let n = self.adverts.len();
            return Err(self.abort(format!("{n} clients advertised keys; at least {} are needed", t + 1)));
        }
        self.phase = Phase::Share;
        Ok(self
            .adverts
            .keys()
            .map(|&i| {
                let theirs = self.graph[i].iter().filter_map(|j| self.adverts.get(j).cloned()).collect();
                (self.setup.cohort[i].clone(), theirs)
            })
            .collect())
    }

    pub fn handle_shares(&mut self, from: &str, sealed: Vec<SealedShares>) -> Result<(), SecAggError> {
        self.expect(Phase::Share, "sealed shares")?;
        let i = self.index(from)?;
        if !self.adverts.contains_key(&i) {
            return Err(SecAggError::Peer(format!("`{from}` sent shares without advertising keys")));
        }
        let mut seen = BTreeSet::new();
        for s in &sealed {
            let j = self.index(&s.to)?;
            if s.from != from || !self.graph[i].contains(&j) || !self.adverts.contains_key(&j) || !seen.insert(j) {
                return Err(SecAggError::Peer(format!("`{from}` sent shares addressed wrongly (to `{}`)", s.to)));
            }
            if s.ciphertext.len() > 1024 {
                return Err(SecAggError::Peer(format!("`{from}` sent an oversized share")));
            }
        }
        if self.outgoing.insert(i, sealed).is_some() {
            return Err(SecAggError::Peer(format!("`{from}` sent shares twice")));
        }
        Ok(())
    }

    /// Ends phase 2: for each client that sent shares, the shares addressed to it by the
    /// others that did (U2).
    pub fn close_shares(&mut self) -> Result<BTreeMap<String, Vec<SealedShares>>, SecAggError> {
        self.expect(Phase::Share, "closing the shares")?;
        let t = self.setup.params.threshold;
        if self.outgoing.len() < t + 1 {
            let n = self.outgoing.len();
            return Err(self.abort(format!("{n} clients shared keys; at least {} are needed", t + 1)));
        }
        let mut inbox: BTreeMap<String, Vec<SealedShares>> =
            self.outgoing.keys().map(|&i| (self.setup.cohort[i].clone(), Vec::new())).collect();
        for sealed in self.outgoing.values() {
            for s in sealed {
                if let Some(box_) = inbox.get_mut(&s.to) {
                    box_.push(s.clone());
                }
            }
        }
        self.phase = Phase::Masked;
        Ok(inbox)
    }

    /// Adds a masked input to the running sum.
    pub fn handle_masked(&mut self, from: &str, input: MaskedInput) -> Result<(), SecAggError> {
        self.expect(Phase::Masked, "a masked input")?;
        let i = self.index(from)?;
        if !self.outgoing.contains_key(&i) {
            return Err(SecAggError::Peer(format!("`{from}` sent a masked input without sharing keys")));
        }
        let modmask = crypto::modulus_mask(self.setup.params.quantizer.bits);
        if input.values.len() != self.setup.vector_len || input.values.iter().any(|v| *v > modmask) {
            return Err(SecAggError::Peer(format!("`{from}` sent a masked input of the wrong length or range")));
        }
        if !self.survivors.insert(i) {
            return Err(SecAggError::Peer(format!("`{from}` sent a second masked input")));
        }
        for (s, v) in self.masked_sum.iter_mut().zip(&input.values) {
            *s = s.wrapping_add(*v) & modmask;
        }
        Ok(())
    }

    /// Ends phase 3: the unmask request (the same for every survivor).
    pub fn close_masked(&mut self) -> Result<UnmaskRequest, SecAggError> {
        self.expect(Phase::Masked, "closing the masked inputs")?;
        let t = self.setup.params.threshold;
        if self.survivors.len() < t {
            let n = self.survivors.len();
            return Err(self.abort(format!("{n} clients sent masked inputs; at least {t} are needed")));
        }
        self.dropped = self.outgoing.keys().filter(|i| !self.survivors.contains(i)).copied().collect();
        self.phase = Phase::Unmask;
        let ids = |set: &BTreeSet<usize>| set.iter().map(|&i| self.setup.cohort[i].clone()).collect();
        Ok(UnmaskRequest { survivors: ids(&self.survivors), dropped: ids(&self.dropped) })
    }

    pub fn handle_unmask(&mut self, from: &str, reply: UnmaskReply) -> Result<(), SecAggError> {
        self.expect(Phase::Unmask, "an unmask reply")?;
        let i = self.index(from)?;
        if !self.survivors.contains(&i) || !self.responded.insert(i) {
            return Err(SecAggError::Peer(format!("`{from}` is not a survivor or answered twice")));
        }
        let mut owners = BTreeSet::new();
        for (kind, shares, allowed) in
            [("self-mask", &reply.seed_shares, &self.survivors), ("key", &reply.key_shares, &self.dropped)]
        {
            for (owner, _) in shares {
                let j = self.index(owner)?;
                if !allowed.contains(&j) || !self.graph[i].contains(&j) || !owners.insert(j) {
                    return Err(SecAggError::Peer(format!(
                        "`{from}` returned an unexpected {kind} share of `{owner}`"
                    )));
                }
            }
        }
        for (owner, share) in reply.seed_shares {
            let j = self.index(&owner)?;
            self.seed_shares.entry(j).or_default().push(share);
        }
        for (owner, share) in reply.key_shares {
            let j = self.index(&owner)?;
            self.key_shares.entry(j).or_default().push(share);
        }
        Ok(())
    }

    /// Clients that sent a masked input: the sum is theirs.
    pub fn survivors(&self) -> Vec<String> {
        self.survivors.iter().map(|&i| self.setup.cohort[i].clone()).collect()
    }

    /// Removes the masks and returns the sum of the survivors' inputs modulo 2^bits.
    pub fn finish(mut self) -> Result<Vec<u64>, SecAggError> {
        self.expect(Phase::Unmask, "finishing")?;
        let round = self.setup.round;
        let bits = self.setup.params.quantizer.bits;
        let t = self.setup.params.threshold;
        let mut sum = std::mem::take(&mut self.masked_sum);
        for &j in &self.survivors {
            let shares = self.seed_shares.get(&j).map_or(&[][..], Vec::as_slice);
            let seed = shamir::combine(shares, t).map_err(|_| {
                SecAggError::Abort(format!(
                    "{} of `{}`'s neighbours returned its self-mask share, {t} are needed",
                    shares.len(),
                    self.setup.cohort[j]
                ))
            })?;
            let seed: [u8; 32] =
                seed[..].try_into().map_err(|_| SecAggError::Peer("a self-mask seed of the wrong size".into()))?;
            crypto::apply_mask(&mut sum, &seed, bits, false);
        }
        for &j in &self.dropped {
            let shares = self.key_shares.get(&j).map_or(&[][..], Vec::as_slice);
            let secret = shamir::combine(shares, t).map_err(|_| {
                SecAggError::Abort(format!(
                    "{} of dropped `{}`'s neighbours returned its key share, {t} are needed",
                    shares.len(),
                    self.setup.cohort[j]
                ))
            })?;
            let secret: [u8; 32] =
                secret[..].try_into().map_err(|_| SecAggError::Peer("a mask key of the wrong size".into()))?;
            let key = KeyPair::from_secret(&secret);
            if key.public() != self.adverts[&j].mask_pk {
                return Err(SecAggError::Abort(format!(
                    "the key rebuilt for dropped `{}` does not match its advert (a neighbour returned a bad share)",
                    self.setup.cohort[j]
                )));
            }
            // Survivors that received j's shares added a pairwise mask with j: take it out.
            for &m in self.graph[j].iter().filter(|m| self.survivors.contains(m)) {
                let seed = key
                    .agree(&self.adverts[&m].mask_pk, &[b"mask", &pairwise_info(round, m, j).concat()])
                    .map_err(|e| SecAggError::Peer(format!("`{}`: {e}", self.setup.cohort[m])))?;
                crypto::apply_mask(&mut sum, &seed, bits, m > j);
            }
        }
        self.phase = Phase::Done;
        Ok(sum)
    }
}

//! The socket-free harness: one `SecAggServer` and n `SecAggClient`s driven through every phase
//! with generated dropout sets, checked against an independent account of who survives. The
//! adversarial tests ([`super::attacks`]) drive the same pieces by hand through [`Session`].

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use ring::hmac;

use super::quantize::Quantizer;
use super::*;

/// A stand-in for certificates: the "certificate" names the client, the "signature" is an
/// HMAC under a key only that client (and the verifier, playing the CA) knows.
pub(crate) struct TestPki;

impl TestPki {
    fn key(client: &[u8]) -> hmac::Key {
        let mut k = b"ca-issued key of ".to_vec();
        k.extend_from_slice(client);
        hmac::Key::new(hmac::HMAC_SHA256, &k)
    }
}

pub(crate) struct TestSigner(pub String);

impl AdvertSigner for TestSigner {
    fn certificate(&self) -> Vec<u8> {
        self.0.as_bytes().to_vec()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        Ok(hmac::sign(&TestPki::key(self.0.as_bytes()), message).as_ref().to_vec())
    }
}

impl PeerVerifier for TestPki {
    fn verify(&self, client: &str, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Rejection> {
        if certificate != client.as_bytes() {
            return Err(Rejection::Certificate("the certificate names another client".into()));
        }
        self.verify_signature(certificate, message, signature).map_err(Rejection::Signature)
    }
    fn verify_signature(&self, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
        hmac::verify(&TestPki::key(certificate), message, signature).map_err(|_| "bad signature".to_string())
    }
}

pub(crate) fn setup(n: usize, t: usize, k: usize, len: usize, round: u64) -> SecAggSetup {
    SecAggSetup {
        round,
        purpose: "train".into(),
        params: SecAggParams {
            threshold: t,
            degree: k,
            dropout_tolerance: 0.0,
            quantizer: Quantizer { bits: 32, clip: 1.0, scale: 1000.0, wrap: false },
        },
        cohort: (0..n).map(|i| format!("c{i:03}")).collect(),
        vector_len: len,
        min_inputs: 1,
    }
}

/// A server, its clients and their inputs, driven phase by phase (by [`run`] or by hand). Every
/// client has joined and made its advert; none is sent yet.
pub(crate) struct Session {
    pub setup: SecAggSetup,
    /// The session id once everybody joined, and its graph.
    pub session: [u8; 32],
    pub graph: Vec<Vec<usize>>,
    pub ids: Vec<String>,
    pub inputs: Vec<Vec<u64>>,
    pub server: SecAggServer,
    pub clients: Vec<SecAggClient>,
    /// Every client's advert as it made it.
    pub adverts: Vec<KeyAdvert>,
    pub rng: rand_chacha::ChaCha20Rng,
}

impl Session {
    /// Every client joins and makes its advert (sent to nobody yet); random inputs.
    pub fn new(setup: SecAggSetup, seed: u64, weakened: Weakened) -> Self {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let max = setup.params.quantizer.max_code();
        let (n, len) = (setup.cohort.len(), setup.vector_len);
        let inputs = (0..n).map(|_| (0..len).map(|_| rng.random_range(0..=max)).collect()).collect();
        let mut server = SecAggServer::new(setup.clone()).unwrap();
        server.weaken(weakened);
        let mut clients = Vec::new();
        for id in &setup.cohort {
            let (c, nonce) = SecAggClient::join_weakened(id, setup.clone(), &mut rng, weakened).unwrap();
            server.handle_join(id, nonce).unwrap();
            clients.push(c);
        }
        let list = server.close_joins().unwrap();
        let adverts = clients
            .iter_mut()
            .zip(&setup.cohort)
            .map(|(c, id)| c.handle_joined(&list, &TestSigner(id.clone()), &mut rng).unwrap())
            .collect();
        let session = server.session_id();
        let graph = setup.neighbours(&session);
        let ids = setup.cohort.clone();
        Self { setup, session, graph, ids, inputs, server, clients, adverts, rng }
    }

    pub fn index(&self, id: &str) -> usize {
        self.ids.binary_search_by(|c| c.as_str().cmp(id)).unwrap()
    }

    /// Phase 1 for everyone but `skip`; then the adverts each client is sent.
    pub fn advertise(&mut self, skip: &[usize]) -> BTreeMap<String, Vec<KeyAdvert>> {
        for (i, a) in self.adverts.clone().into_iter().enumerate().filter(|(i, _)| !skip.contains(i)) {
            self.server.handle_advert(&self.ids[i], a, &TestPki).unwrap();
        }
        self.server.close_adverts().unwrap()
    }

    /// Phase 2 from the given adverts, each answer handed to the server; returns what each sent.
    pub fn share(&mut self, adverts: &BTreeMap<String, Vec<KeyAdvert>>) -> BTreeMap<String, SharedKeys> {
        let mut sent = BTreeMap::new();
        for (id, theirs) in adverts {
            let i = self.index(id);
            let keys = self.clients[i].handle_adverts(theirs, &TestPki, &mut self.rng).unwrap();
            self.server.handle_shares(id, keys.clone()).unwrap();
            sent.insert(id.clone(), keys);
        }
        sent
    }

    /// Phase 3 from the given inboxes: each client's masked input (not yet sent).
    pub fn mask(&mut self, inbox: &BTreeMap<String, Vec<SealedShares>>) -> BTreeMap<String, MaskedInput> {
        let mut masked = BTreeMap::new();
        for (id, sealed) in inbox {
            let i = self.index(id);
            let signer = TestSigner(id.clone());
            masked.insert(id.clone(), self.clients[i].handle_shares(sealed, &self.inputs[i], &signer).unwrap());
        }
        masked
    }

    /// Phases 1 to 3 with nobody dropping: every masked input is in the server's sum. Returns
    /// the shares the server routed to each client, and the masked inputs it received.
    pub fn run_to_masked_inputs(&mut self) -> (BTreeMap<String, Vec<SealedShares>>, BTreeMap<String, MaskedInput>) {
        let adverts = self.advertise(&[]);
        self.share(&adverts);
        let inbox = self.server.close_shares().unwrap();
        let masked = self.mask(&inbox);
        for (id, m) in &masked {
            self.server.handle_masked(id, m.clone(), &TestPki).unwrap();
        }
        (inbox, masked)
    }

    /// Phase 4 with one survivor list for all: the list, and each survivor's unmask request.
    pub fn confirm(&mut self) -> (SurvivorList, BTreeMap<String, UnmaskRequest>) {
        let list = self.server.close_masked().unwrap();
        for id in list.survivors.clone() {
            let i = self.index(&id);
            let signature = self.clients[i].handle_survivors(&list, &TestSigner(id.clone())).unwrap();
            self.server.handle_confirmation(&id, signature, &TestPki).unwrap();
        }
        (list, self.server.close_confirmations().unwrap())
    }

    /// Phase 5: each client's reply to its request (not handed to the server); the first
    /// refusal stops it.
    pub fn unmask(
        &mut self,
        requests: &BTreeMap<String, UnmaskRequest>,
    ) -> Result<Vec<(String, UnmaskReply)>, SecAggError> {
        let mut replies = Vec::new();
        for (id, request) in requests {
            let i = self.index(id);
            replies.push((id.clone(), self.clients[i].handle_unmask(request, &TestPki)?));
        }
        Ok(replies)
    }

    /// Phases 4 and 5 with one survivor list for all; returns each client's reply, already
    /// handed to the server (errors included).
    pub fn confirm_and_unmask(&mut self) -> BTreeMap<String, Result<(), SecAggError>> {
        let (_, requests) = self.confirm();
        let mut results = BTreeMap::new();
        for (id, request) in requests {
            let i = self.index(&id);
            let reply = self.clients[i].handle_unmask(&request, &TestPki).unwrap();
            results.insert(id.clone(), self.server.handle_unmask(&id, reply));
        }
        results
    }

    /// The sum of the inputs of `who`, modulo 2^bits.
    pub fn expected(&self, who: impl IntoIterator<Item = usize>) -> Vec<u64> {
        let mask = crypto::modulus_mask(self.setup.params.quantizer.bits);
        let mut sum = vec![0u64; self.setup.vector_len];
        for j in who {
            for (s, v) in sum.iter_mut().zip(&self.inputs[j]) {
                *s = s.wrapping_add(*v) & mask;
            }
        }
        sum
    }
}

struct Outcome {
    result: Result<Vec<u64>, SecAggError>,
    expected: Option<Vec<u64>>,
}

/// Runs a session where clients in `drops[p]` stop before sending their phase-p message.
fn run(setup: SecAggSetup, drops: &[BTreeSet<usize>; 5], seed: u64) -> Outcome {
    let n = setup.cohort.len();
    let t = setup.params.threshold;
    let mut s = Session::new(setup.clone(), seed, Weakened::default());
    let graph = s.graph.clone();

    // Independent account of who gets how far.
    let count = |i: usize, set: &BTreeSet<usize>| graph[i].iter().filter(|j| set.contains(j)).count();
    let u1: BTreeSet<usize> = (0..n).filter(|i| !drops[0].contains(i)).collect();
    let u2: BTreeSet<usize> = if u1.len() < t + 1 {
        BTreeSet::new()
    } else {
        u1.iter().copied().filter(|&i| !drops[1].contains(&i) && count(i, &u1) >= t).collect()
    };
    let u3: BTreeSet<usize> = if u2.len() < t + 1 {
        BTreeSet::new()
    } else {
        u2.iter().copied().filter(|&i| !drops[2].contains(&i) && count(i, &u2) >= t).collect()
    };
    let u4: BTreeSet<usize> = u3.iter().copied().filter(|i| !drops[3].contains(i)).collect();
    // Those that reveal: all who confirmed, once a quorum of the committee did.
    let committee = setup.committee(&s.session);
    let quorum_met = committee.iter().filter(|c| u4.contains(c)).count() >= setup.quorum(committee.len());
    let u5: BTreeSet<usize> =
        if quorum_met { u4.iter().copied().filter(|i| !drops[4].contains(i)).collect() } else { BTreeSet::new() };
    // Every part of the survivors' graph must hold min_inputs, or nobody reveals.
    let parts_large = graph::part_sizes(&graph, &u3).iter().all(|&size| size >= setup.min_inputs);
    let feasible = u1.len() > t
        && u2.len() > t
        && u3.len() >= t.max(setup.min_inputs)
        && quorum_met
        && parts_large
        && u2.iter().all(|&j| count(j, &u5) >= t);
    let expected = feasible.then(|| s.expected(u3.iter().copied()));

    let ids = s.ids.clone();
    let result = (|| {
        for (i, a) in s.adverts.clone().into_iter().enumerate().filter(|(i, _)| !drops[0].contains(i)) {
            s.server.handle_advert(&ids[i], a, &TestPki)?;
        }
        let adverts = s.server.close_adverts()?;
        for (id, theirs) in adverts {
            let i = s.index(&id);
            match s.clients[i].handle_adverts(&theirs, &TestPki, &mut s.rng) {
                Ok(keys) if !drops[1].contains(&i) => s.server.handle_shares(&id, keys).unwrap(),
                Ok(_) | Err(SecAggError::Abort(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let inbox = s.server.close_shares()?;
        for (id, sealed) in inbox {
            let i = s.index(&id);
            match s.clients[i].handle_shares(&sealed, &s.inputs[i], &TestSigner(id.clone())) {
                Ok(masked) if !drops[2].contains(&i) => s.server.handle_masked(&id, masked, &TestPki).unwrap(),
                Ok(_) | Err(SecAggError::Abort(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let list = s.server.close_masked()?;
        for id in list.survivors.clone() {
            let i = s.index(&id);
            let signature = s.clients[i].handle_survivors(&list, &TestSigner(id.clone()))?;
            if !drops[3].contains(&i) {
                s.server.handle_confirmation(&id, signature, &TestPki)?;
            }
        }
        let requests = s.server.close_confirmations()?;
        for (id, request) in requests {
            let i = s.index(&id);
            if drops[4].contains(&i) {
                continue;
            }
            match s.clients[i].handle_unmask(&request, &TestPki) {
                Ok(reply) => s.server.handle_unmask(&id, reply)?,
                // The survivors' graph fell apart: it reveals nothing, as accounted above.
                Err(SecAggError::Abort(_)) => assert!(!parts_large),
                Err(e) => return Err(e),
            }
        }
        assert_eq!(s.server.survivors().len(), u3.len());
        let unmasked = s.server.finish()?;
        assert!(unmasked.cheaters.is_empty());
        Ok(unmasked.sum)
    })();
    Outcome { result, expected }
}

fn check(outcome: Outcome) -> Result<(), TestCaseError> {
    match (outcome.result, outcome.expected) {
        (Ok(sum), Some(expected)) => prop_assert_eq!(sum, expected),
        (Err(SecAggError::Abort(_)), None) => {}
        (got, expected) => {
            prop_assert!(false, "got {:?}, expected {:?}", got.map(|s| s.len()), expected.map(|s| s.len()))
        }
    }
    Ok(())
}

fn drop_sets(n: usize, rates: [f64; 5], seed: u64) -> [BTreeSet<usize>; 5] {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rates.map(|r| (0..n).filter(|_| rng.random::<f64>() < r).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn the_sum_is_exact_with_enough_survivors_and_aborts_otherwise(
        n in 3usize..=100,
        k_frac in 0.0f64..1.0,
        t_frac in 0.0f64..1.0,
        rates in proptest::array::uniform5(0.0f64..0.2),
        min_frac in 0.0f64..0.5,
        seed: u64,
    ) {
        // An even degree (or the complete graph), and a threshold above half of it.
        let k_max = n - 1;
        let mut k = 2 + ((k_max.saturating_sub(2)) as f64 * k_frac) as usize;
        if k % 2 == 1 && k != k_max { k -= 1; }
        let k = k.min(k_max).max(2);
        let t = k / 2 + 1 + ((k - k / 2 - 1) as f64 * t_frac) as usize;
        let mut s = setup(n, t, k, 6, 3);
        s.min_inputs = 1 + (n as f64 * min_frac) as usize;
        check(run(s, &drop_sets(n, rates, seed), seed))?;
    }
}

#[test]
fn one_hundred_clients_with_dropouts_at_every_phase() {
    let n = 100;
    let drops = drop_sets(n, [0.03; 5], 5);
    let outcome = run(setup(n, 11, 20, 50, 1), &drops, 5);
    assert!(outcome.expected.is_some(), "this dropout pattern leaves enough survivors");
    check(outcome).unwrap();
}

#[test]
fn no_dropouts_complete_graph_and_total_collapse() {
    let none: [BTreeSet<usize>; 5] = Default::default();
    check(run(setup(5, 3, 4, 8, 2), &none, 1)).unwrap();
    for phase in 2..5 {
        let mut all_late: [BTreeSet<usize>; 5] = Default::default();
        all_late[phase] = (0..5).collect();
        let outcome = run(setup(5, 3, 4, 8, 2), &all_late, 1);
        assert!(outcome.expected.is_none());
        assert!(matches!(outcome.result, Err(SecAggError::Abort(_))), "phase {phase}");
    }
}

#[test]
fn a_sum_of_fewer_than_min_inputs_is_never_unmasked() {
    let mut s = setup(6, 3, 4, 4, 4);
    s.min_inputs = 5;
    let mut session = Session::new(s, 4, Weakened::default());
    let adverts = session.advertise(&[]);
    session.share(&adverts);
    let inbox = session.server.close_shares().unwrap();
    let masked = session.mask(&inbox);
    for (id, m) in masked.into_iter().take(4) {
        session.server.handle_masked(&id, m, &TestPki).unwrap();
    }
    assert!(matches!(session.server.close_masked(), Err(SecAggError::Abort(ref m)) if m.contains("at least 5")));
    // A server that asks anyway (a list of four) is refused by every client.
    let list = SurvivorList { survivors: session.ids[..4].to_vec() };
    for i in 0..4 {
        let err = session.clients[i].handle_survivors(&list, &TestSigner(session.ids[i].clone())).unwrap_err();
        assert!(matches!(err, SecAggError::Abort(ref m) if m.contains("fewer than 5")), "{err}");
    }
}

#[test]
fn a_substituted_key_advert_is_left_out() {
    let mut session = Session::new(setup(4, 2, 3, 4, 7), 1, Weakened::default());
    let mut adverts = session.advertise(&[]);
    // The server swaps in a mask key of its own for c001, as seen by c000.
    let forged = crypto::KeyPair::generate(&mut session.rng);
    let to_c000 = adverts.get_mut("c000").unwrap();
    to_c000.iter_mut().find(|a| a.client == "c001").unwrap().mask_pk = forged.public();
    let keys = session.clients[0].handle_adverts(&adverts["c000"], &TestPki, &mut session.rng).unwrap();
    assert_eq!(keys.refused, vec!["c001".to_string()]);
    assert!(keys.sealed.iter().all(|s| s.to != "c001"), "nothing is encrypted to the substituted key");
    // A stranger's certificate in place of a neighbour's is refused too.
    let mut stranger = adverts["c002"].clone();
    stranger.iter_mut().find(|a| a.client == "c001").unwrap().certificate = b"someone else".to_vec();
    let keys = session.clients[2].handle_adverts(&stranger, &TestPki, &mut session.rng).unwrap();
    assert_eq!(keys.refused, vec!["c001".to_string()]);
}

#[test]
fn tampered_and_replayed_share_ciphertexts_are_reported_and_the_sum_stays_exact() {
    let earlier = {
        let mut s = Session::new(setup(5, 3, 4, 4, 21), 21, Weakened::default());
        let adverts = s.advertise(&[]);
        s.share(&adverts);
        s.server.close_shares().unwrap()
    };
    let mut s = Session::new(setup(5, 3, 4, 4, 22), 22, Weakened::default());
    let adverts = s.advertise(&[]);
    s.share(&adverts);
    let mut inbox = s.server.close_shares().unwrap();
    // c000 gets c001's shares tampered with, and c002's replayed from another session.
    let to_c000 = inbox.get_mut("c000").unwrap();
    to_c000.iter_mut().find(|x| x.from == "c001").unwrap().ciphertext[3] ^= 0x40;
    let replayed = earlier["c000"].iter().find(|x| x.from == "c002").unwrap().clone();
    *to_c000.iter_mut().find(|x| x.from == "c002").unwrap() = replayed;
    let masked = s.mask(&inbox);
    assert_eq!(masked["c000"].invalid_shares_from, vec!["c001".to_string(), "c002".to_string()]);
    for (id, m) in masked {
        s.server.handle_masked(&id, m, &TestPki).unwrap();
    }
    assert_eq!(s.server.complaints().len(), 2);
    let results = s.confirm_and_unmask();
    assert!(results.values().all(Result::is_ok), "{results:?}");
    let expected = s.expected(0..5);
    assert_eq!(s.server.finish().unwrap().sum, expected, "c000 masked against both anyway, and holds nothing of them");
}

#[test]
fn settings_that_cannot_give_the_sum_are_refused() {
    let mut s = setup(10, 2, 4, 4, 1);
    assert!(s.check().unwrap_err().to_string().contains("more than half"));
    s.params.threshold = 3;
    s.params.dropout_tolerance = 0.5;
    assert!(s.check().unwrap_err().to_string().contains("cannot be met"));
    s.params.dropout_tolerance = 0.2;
    assert!(s.check().is_ok());
    s.min_inputs = 11;
    assert!(s.check().unwrap_err().to_string().contains("min_inputs"));
    s.min_inputs = 3;
    // Every client holds the whole graph: its size is capped, whatever a server sends.
    let mut huge = setup(100_000, 51, 100, 4, 1);
    huge.min_inputs = 3;
    assert!(huge.check().unwrap_err().to_string().contains("more than one session takes"));
    s.params.quantizer.scale = 1e9;
    assert!(matches!(s.check(), Err(SecAggError::Quantize(_))));
}

#[test]
fn the_session_id_covers_every_setting_and_every_nonce() {
    let base = setup(5, 3, 4, 4, 1);
    let joined = |nonce: u8| JoinList {
        joined: base.cohort.iter().map(|c| Joined { client: c.clone(), nonce: [nonce; 32] }).collect(),
    };
    let id = base.session_id(&joined(1));
    assert_ne!(base.session_id(&joined(2)), id, "a rerun with fresh nonces is another session");
    let mut fewer = joined(1);
    fewer.joined.pop();
    assert_ne!(base.session_id(&fewer), id);
    type Change = Box<dyn Fn(&mut SecAggSetup)>;
    let variants: [Change; 5] = [
        Box::new(|s| s.round = 2),
        Box::new(|s| s.purpose = "census".into()),
        Box::new(|s| s.min_inputs = 2),
        Box::new(|s| s.cohort[4] = "c999".into()),
        Box::new(|s| s.params.quantizer.scale = 999.0),
    ];
    for change in variants {
        let mut other = base.clone();
        change(&mut other);
        assert_ne!(other.session_id(&joined(1)), id);
    }
    // The graph follows the session: the server cannot choose it.
    assert_ne!(setup(20, 3, 4, 4, 1).neighbours(&[1; 32]), setup(20, 3, 4, 4, 1).neighbours(&[2; 32]));
}

#[test]
fn the_committee_is_drawn_by_the_session_and_its_quorum_is_a_majority() {
    let small = setup(10, 5, 8, 4, 1);
    assert_eq!(small.committee(&[1; 32]), (0..10).collect::<Vec<_>>(), "a small cohort is its own committee");
    assert_eq!(small.quorum(10), 7, "t / k of it: tolerates 3 of 10 dropping");
    let large = setup(100, 5, 8, 4, 1);
    let (a, b) = (large.committee(&[1; 32]), large.committee(&[2; 32]));
    assert_eq!(a.len(), 16);
    assert!(a.windows(2).all(|w| w[0] < w[1]) && a != b);
    assert_eq!(large.quorum(16), 10);
    for (n, t, k) in [(3, 2, 2), (5, 3, 4), (7, 4, 6), (100, 11, 20), (40, 5, 8)] {
        let s = setup(n, t, k, 1, 1);
        let m = s.committee(&[3; 32]).len();
        assert!(2 * s.quorum(m) > m, "n {n}: two lists can never both reach the quorum");
    }
}

#[test]
fn a_client_joins_only_a_session_with_its_own_nonce() {
    let s = setup(4, 2, 3, 4, 8);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
    let (mut client, nonce) = SecAggClient::join("c001", s.clone(), &mut rng).unwrap();
    let signer = TestSigner("c001".into());
    let list = |entries: &[(&str, [u8; 32])]| JoinList {
        joined: entries.iter().map(|(c, n)| Joined { client: c.to_string(), nonce: *n }).collect(),
    };
    for bad in [
        list(&[("c000", [0; 32]), ("c002", [0; 32])]),
        list(&[("c000", [0; 32]), ("c001", [9; 32])]),
        list(&[("c001", nonce), ("c000", [0; 32])]),
        list(&[("c001", nonce), ("c001", nonce)]),
    ] {
        assert!(matches!(client.handle_joined(&bad, &signer, &mut rng), Err(SecAggError::Server(_))));
    }
    client.handle_joined(&list(&[("c000", [0; 32]), ("c001", nonce)]), &signer, &mut rng).unwrap();
}

#[test]
fn masked_inputs_travel_compactly_and_round_trip() {
    for values in [vec![0u64, 1, u32::MAX as u64, 7], vec![0u64, u64::MAX, 1 << 40]] {
        let masking = MaskingList { client: "c000".into(), masked_with: Vec::new(), signature: Vec::new() };
        let m = MaskedInput { values: values.clone(), invalid_shares_from: Vec::new(), masking };
        let frame = crate::wire::encode(&m).unwrap();
        let narrow = values.iter().all(|v| *v <= u32::MAX as u64);
        // Header, version, tags and the (empty) masking list: about 24 bytes beside the values.
        assert!(frame.len() < 32 + values.len() * if narrow { 4 } else { 8 });
        let back: MaskedInput = crate::wire::decode_frame(&frame, crate::wire::MAX_FRAME_BYTES).unwrap();
        assert_eq!(back.values, values);
    }
}

#[test]
fn per_segment_weights_average_each_segment_over_those_who_trained_it() {
    let q = Quantizer { bits: 32, clip: 4.0, scale: 1e6, wrap: false };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
    let segments = [3usize, 2, 1];
    let a = [1.0f32, 2.0, 3.0, 9.0, 9.0, 9.0];
    let b = [3.0f32, 2.0, 1.0, 1.0, -1.0, 9.0];
    // a trained only the trunk; b the trunk and the first head; nobody the second head.
    let ea = encode_weighted(&a, &segments, &[1.0, 0.0, 0.0], &q, &mut rng).unwrap();
    let eb = encode_weighted(&b, &segments, &[0.5, 0.5, 0.0], &q, &mut rng).unwrap();
    let sum: Vec<u64> = ea.iter().zip(&eb).map(|(x, y)| (x + y) & 0xffff_ffff).collect();
    let (mean, totals) = weighted_mean_from_sum(&sum, 2, &segments, &q).unwrap();
    let expect = [(1.0 + 1.5) / 1.5, (2.0 + 1.0) / 1.5, (3.0 + 0.5) / 1.5, 1.0, -1.0, 0.0];
    for (m, e) in mean.iter().zip(expect) {
        assert!((*m as f64 - e).abs() < 1e-4, "{mean:?} vs {expect:?}");
    }
    assert!((totals[0] - 1.5).abs() < 1e-5 && (totals[1] - 0.5).abs() < 1e-5 && totals[2].abs() < 1e-5);
    // Segment lengths that do not fit the update are refused, not a panic.
    assert!(encode_weighted(&a, &[3, 2, 1, 0], &[1.0, 0.0, 0.0], &q, &mut rng).is_none());
    assert!(encode_weighted(&a, &[3, 3], &[1.0, 0.0, 0.0], &q, &mut rng).is_none());
}

//! The socket-free harness: one `SecAggServer` and n `SecAggClient`s driven through every phase
//! with generated dropout sets, checked against an independent account of who survives.

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
    fn key(client: &str) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, format!("ca-issued key of {client}").as_bytes())
    }
}

pub(crate) struct TestSigner(pub String);

impl AdvertSigner for TestSigner {
    fn certificate(&self) -> Vec<u8> {
        self.0.as_bytes().to_vec()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        Ok(hmac::sign(&TestPki::key(&self.0), message).as_ref().to_vec())
    }
}

impl PeerVerifier for TestPki {
    fn verify(&self, client: &str, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
        if certificate != client.as_bytes() {
            return Err("the certificate names another client".into());
        }
        hmac::verify(&TestPki::key(client), message, signature).map_err(|_| "bad signature".to_string())
    }
}

pub(crate) fn setup(n: usize, t: usize, k: usize, len: usize, round: u64) -> SecAggSetup {
    SecAggSetup {
        round,
        params: SecAggParams {
            threshold: t,
            degree: k,
            dropout_tolerance: 0.0,
            quantizer: Quantizer { bits: 32, clip: 1.0, scale: 1000.0 },
        },
        cohort: (0..n).map(|i| format!("c{i:03}")).collect(),
        graph_seed: 99,
        vector_len: len,
    }
}

struct Outcome {
    result: Result<Vec<u64>, SecAggError>,
    expected: Option<Vec<u64>>,
}

/// Runs a round where clients in `drops[p]` stop before sending their phase-p message.
fn run(setup: SecAggSetup, drops: &[BTreeSet<usize>; 4], seed: u64) -> Outcome {
    let n = setup.cohort.len();
    let t = setup.params.threshold;
    let len = setup.vector_len;
    let graph = setup.neighbours();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let max = setup.params.quantizer.max_code();
    let inputs: Vec<Vec<u64>> = (0..n).map(|_| (0..len).map(|_| rng.random_range(0..=max)).collect()).collect();
    let ids = setup.cohort.clone();
    let mut server = SecAggServer::new(setup.clone()).unwrap();

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
    let feasible = u1.len() > t && u2.len() > t && u3.len() >= t && u2.iter().all(|&j| count(j, &u4) >= t);
    let expected = feasible.then(|| {
        let mut sum = vec![0u64; len];
        for &j in &u3 {
            for (s, v) in sum.iter_mut().zip(&inputs[j]) {
                *s = s.wrapping_add(*v) & 0xffff_ffff;
            }
        }
        sum
    });

    let mut clients: BTreeMap<usize, SecAggClient> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let (client, advert) = SecAggClient::start(id, setup.clone(), &TestSigner(id.clone()), &mut rng).unwrap();
        if !drops[0].contains(&i) {
            server.handle_advert(id, advert).unwrap();
            clients.insert(i, client);
        }
    }
    let result = (|| {
        let adverts = server.close_adverts()?;
        for (id, theirs) in adverts {
            let i = ids.binary_search(&id).unwrap();
            let client = clients.get_mut(&i).unwrap();
            match client.handle_adverts(&theirs, &TestPki, &mut rng) {
                Ok(sealed) if !drops[1].contains(&i) => server.handle_shares(&id, sealed).unwrap(),
                Ok(_) => {}
                Err(SecAggError::Abort(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let inbox = server.close_shares()?;
        for (id, sealed) in inbox {
            let i = ids.binary_search(&id).unwrap();
            match clients.get_mut(&i).unwrap().handle_shares(&sealed, &inputs[i]) {
                Ok(masked) if !drops[2].contains(&i) => server.handle_masked(&id, masked).unwrap(),
                Ok(_) => {}
                Err(SecAggError::Abort(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let request = server.close_masked()?;
        for id in request.survivors.clone() {
            let i = ids.binary_search(&id).unwrap();
            if drops[3].contains(&i) {
                continue;
            }
            let reply = clients.get_mut(&i).unwrap().handle_unmask(&request)?;
            server.handle_unmask(&id, reply)?;
        }
        assert_eq!(server.survivors().len(), u3.len());
        server.finish()
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

fn drop_sets(n: usize, rates: [f64; 4], seed: u64) -> [BTreeSet<usize>; 4] {
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
        rates in proptest::array::uniform4(0.0f64..0.25),
        seed: u64,
    ) {
        // An even degree (or the complete graph), and a threshold above half of it.
        let k_max = n - 1;
        let mut k = 2 + ((k_max.saturating_sub(2)) as f64 * k_frac) as usize;
        if k % 2 == 1 && k != k_max { k -= 1; }
        let k = k.min(k_max).max(2);
        let t = k / 2 + 1 + ((k - k / 2 - 1) as f64 * t_frac) as usize;
        check(run(setup(n, t, k, 6, 3), &drop_sets(n, rates, seed), seed))?;
    }
}

#[test]
fn one_hundred_clients_with_dropouts_at_every_phase() {
    let n = 100;
    let drops = drop_sets(n, [0.03, 0.03, 0.03, 0.03], 5);
    let outcome = run(setup(n, 11, 20, 50, 1), &drops, 5);
    assert!(outcome.expected.is_some(), "this dropout pattern leaves enough survivors");
    check(outcome).unwrap();
}

#[test]
fn no_dropouts_complete_graph_and_total_collapse() {
    let none: [BTreeSet<usize>; 4] = Default::default();
    check(run(setup(5, 3, 4, 8, 2), &none, 1)).unwrap();
    let mut all_late: [BTreeSet<usize>; 4] = Default::default();
    all_late[3] = (0..5).collect();
    let outcome = run(setup(5, 3, 4, 8, 2), &all_late, 1);
    assert!(outcome.expected.is_none());
    assert!(matches!(outcome.result, Err(SecAggError::Abort(_))));
}

#[test]
fn a_substituted_key_advert_is_detected() {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let (mut server, mut clients) = advertised(setup(4, 2, 3, 4, 7), &mut rng);
    let mut adverts = server.close_adverts().unwrap();
    // The server swaps in a mask key of its own for c001, as seen by c000.
    let forged = super::crypto::KeyPair::generate(&mut rng);
    let to_c000 = adverts.get_mut("c000").unwrap();
    to_c000.iter_mut().find(|a| a.client == "c001").unwrap().mask_pk = forged.public();
    let err = clients[0].handle_adverts(&adverts["c000"], &TestPki, &mut rng).unwrap_err();
    assert!(matches!(err, SecAggError::Server(ref m) if m.contains("substituted")), "{err}");
    // A stranger's certificate in place of a neighbour's is refused too.
    let mut stranger = adverts["c002"].clone();
    stranger.iter_mut().find(|a| a.client == "c001").unwrap().certificate = b"someone else".to_vec();
    assert!(matches!(clients[2].handle_adverts(&stranger, &TestPki, &mut rng), Err(SecAggError::Server(_))));
}

/// A server and every cohort member, each having advertised its keys.
fn advertised(s: SecAggSetup, rng: &mut rand_chacha::ChaCha20Rng) -> (SecAggServer, Vec<SecAggClient>) {
    let mut server = SecAggServer::new(s.clone()).unwrap();
    let mut clients = Vec::new();
    for id in &s.cohort {
        let (c, a) = SecAggClient::start(id, s.clone(), &TestSigner(id.clone()), rng).unwrap();
        server.handle_advert(id, a).unwrap();
        clients.push(c);
    }
    (server, clients)
}

/// Four clients of `round` through key sharing: the server, the clients and their inboxes.
fn to_shares(round: u64) -> (SecAggServer, Vec<SecAggClient>, BTreeMap<String, Vec<SealedShares>>) {
    let s = setup(4, 2, 3, 4, round);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(round);
    let (mut server, mut clients) = advertised(s.clone(), &mut rng);
    for (id, theirs) in server.close_adverts().unwrap() {
        let i = s.cohort.binary_search(&id).unwrap();
        let sealed = clients[i].handle_adverts(&theirs, &TestPki, &mut rng).unwrap();
        server.handle_shares(&id, sealed).unwrap();
    }
    let inbox = server.close_shares().unwrap();
    (server, clients, inbox)
}

/// Drives four clients to the unmask phase (c003 never sends its masked input).
fn to_unmask(round: u64) -> (Vec<SecAggClient>, UnmaskRequest, BTreeMap<String, Vec<SealedShares>>) {
    let (mut server, mut clients, inbox) = to_shares(round);
    for (i, (id, sealed)) in inbox.iter().enumerate() {
        let masked = clients[i].handle_shares(sealed, &[1, 2, 3, 4]).unwrap();
        if i != 3 {
            server.handle_masked(id, masked).unwrap();
        }
    }
    (clients, server.close_masked().unwrap(), inbox)
}

#[test]
fn a_client_refuses_to_give_both_kinds_of_share_of_one_peer() {
    let (mut clients, mut request, _) = to_unmask(11);
    assert_eq!(request.dropped, vec!["c003".to_string()]);
    request.dropped.push("c001".into()); // c001 survived: asking for its key share too
    let err = clients[0].handle_unmask(&request).unwrap_err();
    assert!(matches!(err, SecAggError::Server(ref m) if m.contains("both")), "{err}");
}

#[test]
fn tampered_and_replayed_share_ciphertexts_are_rejected() {
    let (_, _, inbox_a) = to_unmask(21);
    let (_, mut clients, inbox) = to_shares(22);
    let mut tampered = inbox["c000"].clone();
    tampered[0].ciphertext[3] ^= 0x40;
    assert!(matches!(clients[0].handle_shares(&tampered, &[0; 4]), Err(SecAggError::Peer(_))));
    // A ciphertext from another round, replayed, fails authentication.
    let replayed = inbox_a["c000"].clone();
    assert!(matches!(clients[0].handle_shares(&replayed, &[0; 4]), Err(SecAggError::Peer(_))));
    // The genuine shares still work.
    assert!(clients[0].handle_shares(&inbox["c000"], &[0; 4]).is_ok());
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
    s.params.quantizer.scale = 1e9;
    assert!(matches!(s.check(), Err(SecAggError::Quantize(_))));
}

#[test]
fn masked_inputs_travel_compactly_and_round_trip() {
    for values in [vec![0u64, 1, u32::MAX as u64, 7], vec![0u64, u64::MAX, 1 << 40]] {
        let m = MaskedInput { values: values.clone() };
        let frame = crate::wire::encode(&m).unwrap();
        let narrow = values.iter().all(|v| *v <= u32::MAX as u64);
        assert!(frame.len() < 16 + values.len() * if narrow { 4 } else { 8 });
        let back: MaskedInput = crate::wire::decode_frame(&frame, crate::wire::MAX_FRAME_BYTES).unwrap();
        assert_eq!(back.values, values);
    }
}

#[test]
fn per_segment_weights_average_each_segment_over_those_who_trained_it() {
    let q = Quantizer { bits: 32, clip: 4.0, scale: 1e6 };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
    let segments = [3usize, 2, 1];
    let a = [1.0f32, 2.0, 3.0, 9.0, 9.0, 9.0];
    let b = [3.0f32, 2.0, 1.0, 1.0, -1.0, 9.0];
    // a trained only the trunk; b the trunk and the first head; nobody the second head.
    let ea = encode_weighted(&a, &segments, &[1.0, 0.0, 0.0], &q, &mut rng);
    let eb = encode_weighted(&b, &segments, &[0.5, 0.5, 0.0], &q, &mut rng);
    let sum: Vec<u64> = ea.iter().zip(&eb).map(|(x, y)| (x + y) & 0xffff_ffff).collect();
    let (mean, totals) = weighted_mean_from_sum(&sum, 2, &segments, &q).unwrap();
    let expect = [(1.0 + 1.5) / 1.5, (2.0 + 1.0) / 1.5, (3.0 + 0.5) / 1.5, 1.0, -1.0, 0.0];
    for (m, e) in mean.iter().zip(expect) {
        assert!((*m as f64 - e).abs() < 1e-4, "{mean:?} vs {expect:?}");
    }
    assert!((totals[0] - 1.5).abs() < 1e-5 && (totals[1] - 0.5).abs() < 1e-5 && totals[2].abs() < 1e-5);
}

//! Attack tests: a server or a client doing its worst against the protocol, in the socket-free
//! harness. Each attack is run twice where the protocol allows it: with the protection off
//! ([`Weakened`], test builds only), where it must succeed (so the test can fail), and with the
//! protection on, where it must learn no individual input, or be caught with the cheater named
//! while the honest sum stays exact.

use std::collections::BTreeMap;

use super::crypto::{self, KeyPair};
use super::harness::{setup, Session, TestPki, TestSigner};
use super::shamir::{self, Share};
use super::*;

/// What the server computes of client `j`'s input from its masked input, its self-mask seed and
/// its pairwise mask seeds with the neighbours it masked against.
fn strip_masks(s: &Session, j: usize, masked: &[u64], seed: &[u8; 32], pairwise: &[(usize, [u8; 32])]) -> Vec<u64> {
    let bits = s.setup.params.quantizer.bits;
    let mut v = masked.to_vec();
    crypto::apply_mask(&mut v, seed, bits, false);
    for (m, pair_seed) in pairwise {
        crypto::apply_mask(&mut v, pair_seed, bits, j > *m);
    }
    v
}

/// What the server reads of `group`'s sum: their masked inputs less their seeds and their masks
/// with the neighbours in `dropped`, whose mask keys it rebuilt. `None` when a seed or a key is
/// missing (it could not be read).
fn group_sum(
    s: &Session,
    group: &[usize],
    masked: &BTreeMap<String, MaskedInput>,
    seeds: &BTreeMap<String, [u8; 32]>,
    keys: &BTreeMap<String, [u8; 32]>,
    dropped: &[usize],
) -> Option<Vec<u64>> {
    let mask = crypto::modulus_mask(s.setup.params.quantizer.bits);
    let mut sum = vec![0u64; s.setup.vector_len];
    for &r in group {
        let mut pairwise = Vec::new();
        for &d in s.graph[r].iter().filter(|m| dropped.contains(m)) {
            let key = KeyPair::from_secret(keys.get(&s.ids[d])?);
            pairwise.push((d, pairwise_seed(s, &key, d, r)));
        }
        let alone = strip_masks(s, r, &masked[&s.ids[r]].values, seeds.get(&s.ids[r])?, &pairwise);
        sum.iter_mut().zip(alone).for_each(|(acc, v)| *acc = acc.wrapping_add(v) & mask);
    }
    Some(sum)
}

/// The pairwise mask seed of `j` and `m`, from `j`'s rebuilt mask key.
fn pairwise_seed(s: &Session, key: &KeyPair, j: usize, m: usize) -> [u8; 32] {
    *key.agree(&s.adverts[m].mask_pk, &[&mask_info(&s.session, j, m)[..]]).unwrap()
}

/// Client `i`'s confirmation of a survivor list, as the server passes it on.
fn confirmation(s: &Session, i: usize, signature: Vec<u8>) -> Confirmation {
    Confirmation { client: s.ids[i].clone(), certificate: s.ids[i].as_bytes().to_vec(), signature }
}

/// Secrets rebuilt by the server from the shares it was given, by owner.
fn rebuilt(replies: &[(String, UnmaskReply)], t: usize, kind: &str) -> BTreeMap<String, [u8; 32]> {
    let mut shares: BTreeMap<String, Vec<Share>> = BTreeMap::new();
    for (_, reply) in replies {
        let list = if kind == "seed" { &reply.seed_shares } else { &reply.key_shares };
        for (owner, share) in list {
            shares.entry(owner.clone()).or_default().push(share.clone());
        }
    }
    shares
        .into_iter()
        .filter_map(|(owner, s)| shamir::combine(&s, t).ok().map(|secret| (owner, secret[..].try_into().unwrap())))
        .collect()
}

// (a) A dropped client's seed from the recorded ciphertexts of its edges and the survivors'
// seed shares (protocol v1 encrypted both directions of an edge under one keystream).
fn recover_a_late_clients_input(weakened: Weakened) -> (bool, bool) {
    let (n, t) = (5, 3);
    let mut s = Session::new(setup(n, t, 4, 6, 9), 9, weakened);
    let adverts = s.advertise(&[]);
    let sent = s.share(&adverts);
    let inbox = s.server.close_shares().unwrap();
    let masked = s.mask(&inbox);
    // c004's masked input arrives late: it counts as dropped, and the server records it.
    let late = "c004";
    let d = s.index(late);
    for (id, m) in &masked {
        if id != late {
            s.server.handle_masked(id, m.clone(), &TestPki).unwrap();
        }
    }
    let (list, requests) = s.confirm();
    let mut replies = Vec::new();
    for (id, request) in requests {
        let i = s.index(&id);
        replies.push((id.clone(), s.clients[i].handle_unmask(&request, &TestPki).unwrap()));
    }
    // The honest part: the survivors' seeds and c004's mask key, as the protocol intends.
    let seeds = rebuilt(&replies, t, "seed");
    let keys = rebuilt(&replies, t, "key");
    let late_key = KeyPair::from_secret(&keys[late]);
    assert_eq!(late_key.public(), s.adverts[d].mask_pk, "the honest recovery of a dropped client's key");

    // The attack: with t shares of survivor X's seed, the server knows every share X dealt,
    // including X -> c004's plaintext prefix; against the same keystream, c004 -> X's prefix is
    // c004's seed share for X.
    let mut late_shares = Vec::new();
    for x in list.survivors.iter().map(|id| s.index(id)) {
        let x_id = &s.ids[x];
        let shares_of_x: Vec<Share> = replies
            .iter()
            .flat_map(|(_, r)| r.seed_shares.iter().filter(|(o, _)| o == x_id).map(|(_, sh)| sh.clone()))
            .collect();
        // X dealt its shares to its neighbours in index order at points 1, 2, ...
        let neighbours = &s.graph[x];
        let at = 1 + neighbours.iter().position(|&m| m == d).unwrap() as u8;
        let y = shamir::interpolate(&shares_of_x, t, at).unwrap();
        let mut known = vec![at, 32];
        known.extend_from_slice(&y);
        let x_to_d = &sent[x_id].sealed.iter().find(|c| c.to == late).unwrap().ciphertext;
        let d_to_x = &sent[late].sealed.iter().find(|c| &c.to == x_id).unwrap().ciphertext;
        let plain: Vec<u8> = (0..known.len()).map(|b| d_to_x[b] ^ x_to_d[b] ^ known[b]).collect();
        late_shares.push(Share { x: plain[0], y: plain[2..34].to_vec() });
    }
    let guessed: [u8; 32] = shamir::combine(&late_shares, t).map_or([0; 32], |g| g[..].try_into().unwrap());
    let seed_found = seed_commitment(&s.session, d, &guessed) == s.adverts[d].seed_commitment;
    let pairwise: Vec<(usize, [u8; 32])> =
        s.graph[d].iter().map(|&m| (m, pairwise_seed(&s, &late_key, d, m))).collect();
    let input = strip_masks(&s, d, &masked[late].values, &guessed, &pairwise);
    assert_eq!(seeds.len(), n - 1);
    (seed_found, input == s.inputs[d])
}

#[test]
fn a_a_late_clients_seed_cannot_be_read_off_the_recorded_share_ciphertexts() {
    assert_eq!(
        recover_a_late_clients_input(Weakened { symmetric_share_keys: true, ..Default::default() }),
        (true, true),
        "with one key for both directions of an edge (v1), the server recovers the late client's input"
    );
    assert_eq!(
        recover_a_late_clients_input(Weakened::default()),
        (false, false),
        "with a key per direction, the keystreams differ and nothing is learnt"
    );
}

// (b) Different survivor lists to different clients: c000's neighbours are told it survived,
// and each of them is told the others dropped, so the server collects c000's seed and every
// pairwise key around it.
fn split_views(weakened: Weakened) -> Result<bool, SecAggError> {
    // Six clients, all neighbours (degree 5), threshold 3: the smallest graph where the views
    // can be split with lists of t clients each.
    let (n, t) = (6, 3);
    let mut setup = setup(n, t, 5, 6, 12);
    setup.min_inputs = t;
    let mut s = Session::new(setup, 12, weakened);
    let adverts = s.advertise(&[]);
    s.share(&adverts);
    let inbox = s.server.close_shares().unwrap();
    let masked = s.mask(&inbox);
    let target = 0;
    // The server holds every masked input (it receives them one by one).
    let mut replies = Vec::new();
    let mut signatures = BTreeMap::new();
    // Client m is told that c000, it and the next one survived: each other client is missing
    // from the lists of t of its neighbours, who return its key share.
    let lists: Vec<SurvivorList> = (1..n)
        .map(|m| {
            let next = if m == n - 1 { 1 } else { m + 1 };
            let mut list = vec![s.ids[target].clone(), s.ids[m].clone(), s.ids[next].clone()];
            list.sort();
            SurvivorList { survivors: list }
        })
        .collect();
    for (m, list) in (1..n).zip(&lists) {
        let sig = s.clients[m].handle_survivors(list, &TestSigner(s.ids[m].clone()))?;
        signatures.insert(m, sig);
    }
    for (m, _) in (1..n).zip(&lists) {
        // Every signature the server has, whatever list it covers.
        let confirmations = signatures
            .iter()
            .filter(|(j, _)| **j != m)
            .map(|(j, sig)| Confirmation {
                client: s.ids[*j].clone(),
                certificate: s.ids[*j].as_bytes().to_vec(),
                signature: sig.clone(),
            })
            .collect();
        let masking = masked.values().map(|x| x.masking.clone()).collect();
        let reply = s.clients[m].handle_unmask(&UnmaskRequest { confirmations, masking }, &TestPki)?;
        replies.push((s.ids[m].clone(), reply));
    }
    let seed = rebuilt(&replies, t, "seed")[&s.ids[target]];
    let keys = rebuilt(&replies, t, "key");
    let pairwise: Vec<(usize, [u8; 32])> =
        (1..n).map(|m| (m, pairwise_seed(&s, &KeyPair::from_secret(&keys[&s.ids[m]]), m, target))).collect();
    let input = strip_masks(&s, target, &masked[&s.ids[target]].values, &seed, &pairwise);
    Ok(input == s.inputs[target])
}

#[test]
fn b_different_survivor_lists_for_different_clients_reveal_nothing() {
    let off = split_views(Weakened { skip_consistency_check: true, ..Default::default() });
    assert_eq!(off, Ok(true), "without the consistency check the server reads c000's input");
    let on = split_views(Weakened::default()).unwrap_err();
    assert!(
        matches!(on, SecAggError::Abort(ref m) if m.contains("confirmed the survivor list")),
        "with it, the first client asked refuses to reveal anything: {on}"
    );
}

// (c) One client asked for both kinds of share of a peer: a second list after it revealed, or a
// list that names a client twice. The server runs an ordinary round in which c001 survives (so it
// rebuilds c001's self-mask seed), then shows the four others a second list in which c001
// dropped, to get c001's mask key as well: with both, c001's input comes off its masked input.
// Returns whether it does, and whether every client asked twice returned both kinds of share of
// c001.
fn ask_twice(weakened: Weakened) -> Result<(bool, bool), SecAggError> {
    let (n, t, target) = (5, 3, 1);
    let mut s = Session::new(setup(n, t, 4, 4, 11), 11, weakened);
    let (_, masked) = s.run_to_masked_inputs();
    let (_, requests) = s.confirm();
    let first = s.unmask(&requests)?;
    let seed = rebuilt(&first, t, "seed")[&s.ids[target]];
    // The four others are a quorum of the committee (all five, quorum 4): they confirm the
    // second list, if they answer it at all.
    let others: Vec<usize> = (0..n).filter(|&i| i != target).collect();
    let list = SurvivorList { survivors: others.iter().map(|&i| s.ids[i].clone()).collect() };
    let mut confirmations = Vec::new();
    for &i in &others {
        let signature = s.clients[i].handle_survivors(&list, &TestSigner(s.ids[i].clone()))?;
        confirmations.push(confirmation(&s, i, signature));
    }
    let masking = others.iter().map(|&i| masked[&s.ids[i]].masking.clone()).collect();
    let request = UnmaskRequest { confirmations, masking };
    let second = s.unmask(&others.iter().map(|&i| (s.ids[i].clone(), request.clone())).collect())?;
    let of_target = |shares: &[(ClientId, Share)]| shares.iter().any(|(owner, _)| *owner == s.ids[target]);
    let both = second.iter().all(|(id, reply)| {
        of_target(&reply.key_shares) && first.iter().any(|(f, r)| f == id && of_target(&r.seed_shares))
    });
    let key = KeyPair::from_secret(&rebuilt(&second, t, "key")[&s.ids[target]]);
    let pairwise: Vec<(usize, [u8; 32])> =
        s.graph[target].iter().map(|&m| (m, pairwise_seed(&s, &key, target, m))).collect();
    let input = strip_masks(&s, target, &masked[&s.ids[target]].values, &seed, &pairwise);
    Ok((input == s.inputs[target], both))
}

/// Guards a client's one answer per session: once it answered an unmask request its session is
/// over, so no second survivor list is confirmed or answered (`Weakened::answer_twice` lets it).
#[test]
fn c_a_client_answers_one_survivor_list_once() {
    let twice = Weakened { answer_twice: true, ..Default::default() };
    assert_eq!(
        ask_twice(twice),
        Ok((true, true)),
        "clients that answer a second list return c001's key share after its seed share: c001's input comes out"
    );
    let err = ask_twice(Weakened::default()).unwrap_err();
    assert!(matches!(err, SecAggError::Phase("a survivor list", "done")), "the second list is refused: {err}");
    let mut s = Session::new(setup(5, 3, 4, 4, 11), 11, Weakened::default());
    s.run_to_masked_inputs();
    let all = s.server.close_masked().unwrap();
    let twice = SurvivorList { survivors: vec!["c000".into(), "c001".into(), "c001".into(), "c002".into()] };
    let unsorted = SurvivorList { survivors: vec!["c002".into(), "c000".into(), "c001".into()] };
    let stranger = SurvivorList { survivors: vec!["c000".into(), "c001".into(), "c777".into()] };
    for bad in [&twice, &unsorted, &stranger] {
        assert!(matches!(s.clients[0].handle_survivors(bad, &TestSigner("c000".into())), Err(SecAggError::Server(_))));
    }
    for id in all.survivors.clone() {
        let i = s.index(&id);
        let sig = s.clients[i].handle_survivors(&all, &TestSigner(id.clone())).unwrap();
        s.server.handle_confirmation(&id, sig, &TestPki).unwrap();
    }
    let requests = s.server.close_confirmations().unwrap();
    let reply = s.clients[0].handle_unmask(&requests["c000"], &TestPki).unwrap();
    assert_eq!(reply.seed_shares.len(), 4, "c001..c004 survived: their seed shares, no key share");
    assert!(reply.key_shares.is_empty());
    // Now the server says c001 dropped, to get its key share too: refused, in every form.
    let without = SurvivorList { survivors: vec!["c000".into(), "c002".into(), "c003".into(), "c004".into()] };
    assert!(matches!(s.clients[0].handle_survivors(&without, &TestSigner("c000".into())), Err(SecAggError::Phase(..))));
    assert!(matches!(s.clients[0].handle_unmask(&requests["c000"], &TestPki), Err(SecAggError::Phase(..))));
    // And a server that passes a key share of a survivor on is not helped by the protocol: the
    // honest server refuses to use it.
    let mut greedy = s.clients[1].handle_unmask(&requests["c001"], &TestPki).unwrap();
    let (owner, share) = greedy.seed_shares.pop().unwrap();
    greedy.key_shares.push((owner, share));
    assert!(matches!(s.server.handle_unmask("c001", greedy), Err(SecAggError::Cheater { .. })));
}

// (d) An advert replayed from another sum of the same round (a label census) or another round.
fn replay_advert(weakened: Weakened, from_purpose: &str, from_round: u64) -> bool {
    let mut census_setup = setup(4, 2, 3, 4, from_round);
    census_setup.purpose = from_purpose.into();
    let census = Session::new(census_setup, 30, weakened);
    let mut train = Session::new(setup(4, 2, 3, 4, 5), 31, weakened);
    let mut adverts = train.advertise(&[]);
    let old = census.adverts[1].clone();
    *adverts.get_mut("c000").unwrap().iter_mut().find(|a| a.client == "c001").unwrap() = old;
    let keys = train.clients[0].handle_adverts(&adverts["c000"], &TestPki, &mut train.rng).unwrap();
    !keys.refused.contains(&"c001".to_string())
}

#[test]
fn d_adverts_replayed_across_sums_and_rounds_are_refused() {
    let v1 = Weakened { unbound_adverts: true, ..Default::default() };
    assert!(replay_advert(v1, "census", 5), "v1 signed the round only: a census advert passes in training");
    assert!(!replay_advert(v1, "train", 4), "v1 did bind the round");
    for (purpose, round) in [("census", 5), ("evaluate", 5), ("train", 4), ("train", 5)] {
        assert!(!replay_advert(Weakened::default(), purpose, round), "{purpose} round {round} replayed");
    }
    // The server refuses a replayed advert from a client as well, naming it.
    let mut s = Session::new(setup(4, 2, 3, 4, 5), 32, Weakened::default());
    let other = Session::new(setup(4, 2, 3, 4, 6), 33, Weakened::default());
    let err = s.server.handle_advert("c001", other.adverts[1].clone(), &TestPki).unwrap_err();
    assert!(matches!(err, SecAggError::Cheater { ref client, .. } if client == "c001"), "{err}");
}

/// What a session with a cheater gave: its result, the honest sum, and the server's answer to
/// each unmask reply (the cheater's first).
struct CheatedSession {
    result: Result<Unmasked, SecAggError>,
    expected: Vec<u64>,
    replies: Vec<Result<(), SecAggError>>,
}

/// A session of 7 clients (degree 4, threshold 3) in which c001 returns `tamper`ed shares.
fn with_a_cheating_holder(weakened: Weakened, tamper: impl Fn(&mut UnmaskReply)) -> CheatedSession {
    let mut s = Session::new(setup(7, 3, 4, 8, 14), 14, weakened);
    s.run_to_masked_inputs();
    let (_, requests) = s.confirm();
    // The cheater answers first, so that v1 (first t shares) would use its share.
    let mut order: Vec<&String> = requests.keys().collect();
    order.sort_by_key(|id| *id != "c001");
    let mut results = Vec::new();
    for id in order {
        let i = s.index(id);
        let mut reply = s.clients[i].handle_unmask(&requests[id], &TestPki).unwrap();
        if id == "c001" {
            tamper(&mut reply);
        }
        results.push(s.server.handle_unmask(id, reply));
    }
    let expected = s.expected(0..7);
    CheatedSession { result: s.server.finish(), expected, replies: results }
}

#[test]
fn e_a_wrong_zero_or_short_share_names_its_sender_and_the_sum_stays_exact() {
    let wrong = |r: &mut UnmaskReply| r.seed_shares[0].1.y[5] ^= 1;
    let zero = |r: &mut UnmaskReply| r.seed_shares[0].1.x = 0;
    let short = |r: &mut UnmaskReply| r.seed_shares[0].1.y.truncate(16);
    // v1 used the first t shares as they came: garbage silently, or the round lost.
    let v1 = Weakened { trust_returned_shares: true, ..Default::default() };
    let session = with_a_cheating_holder(v1, wrong);
    assert!(session.replies.iter().all(Result::is_ok), "v1 names nobody");
    match session.result {
        Ok(unmasked) => assert_ne!(unmasked.sum, session.expected, "v1: one wrong share turns the sum into noise"),
        // The range check of the sum (a later protection) catches the noise, but not who made it.
        Err(e) => assert!(matches!(e, SecAggError::Abort(ref m) if m.contains("outside")), "{e}"),
    }
    for bad in [zero as fn(&mut UnmaskReply), short] {
        assert!(matches!(with_a_cheating_holder(v1, bad).result, Err(SecAggError::Abort(_))), "v1 loses the round");
    }
    for bad in [wrong as fn(&mut UnmaskReply), zero, short] {
        let CheatedSession { result, expected, replies } = with_a_cheating_holder(Weakened::default(), bad);
        assert!(
            matches!(&replies[0], Err(SecAggError::Cheater { client, .. }) if client == "c001"),
            "{:?}",
            replies[0]
        );
        assert!(replies[1..].iter().all(Result::is_ok));
        let unmasked = result.unwrap();
        assert_eq!(unmasked.sum, expected, "the other neighbours' shares rebuild the seed");
        assert_eq!(unmasked.cheaters.len(), 1);
        assert_eq!(unmasked.cheaters[0].0, "c001");
    }
}

/// What a session of 7 clients gave in which c002 sealed one neighbour (the victim) a share that
/// does not match its commitment.
struct BadDealer {
    victim: String,
    /// Whom the victim reported with its masked input.
    reported: Vec<String>,
    complaints: Vec<(ClientId, ClientId)>,
    /// The server's answer to each unmask reply.
    replies: BTreeMap<String, Result<(), SecAggError>>,
    unmasked: Unmasked,
}

fn with_a_bad_dealer(weakened: Weakened) -> BadDealer {
    let mut s = Session::new(setup(7, 3, 4, 8, 15), 15, weakened);
    let adverts = s.advertise(&[]);
    let mut sent = BTreeMap::new();
    for (id, theirs) in &adverts {
        let i = s.index(id);
        let mut keys = s.clients[i].handle_adverts(theirs, &TestPki, &mut s.rng).unwrap();
        if id == "c002" {
            keys.sealed[0].seed_commitment[0] ^= 1;
        }
        s.server.handle_shares(id, keys.clone()).unwrap();
        sent.insert(id.clone(), keys);
    }
    let victim = sent["c002"].sealed[0].to.clone();
    let inbox = s.server.close_shares().unwrap();
    let masked = s.mask(&inbox);
    let reported = masked[&victim].invalid_shares_from.clone();
    for (id, m) in masked {
        s.server.handle_masked(&id, m, &TestPki).unwrap();
    }
    let complaints = s.server.complaints();
    let replies = s.confirm_and_unmask();
    let expected = s.expected(0..7);
    let unmasked = s.server.finish().unwrap();
    assert_eq!(unmasked.sum, expected, "the other neighbours' shares rebuild c002's seed either way");
    BadDealer { victim, reported, complaints, replies, unmasked }
}

/// A dealer whose shares match its commitments but not the seed it committed to in its advert.
fn with_a_wrong_seed_commitment(weakened: Weakened) -> Result<Unmasked, SecAggError> {
    let mut s = Session::new(setup(7, 3, 4, 8, 16), 16, weakened);
    // (Standing in for shares from another polynomial: its advert commits to another seed.
    // The commitment is signed, so re-sign it as c003 would.)
    let session = s.session;
    s.adverts[3].seed_commitment = [9; 32];
    let message = advert_message(&s.setup, &session, &s.adverts[3], weakened);
    s.adverts[3].signature = TestSigner("c003".into()).sign(&message).unwrap();
    s.run_to_masked_inputs();
    s.confirm_and_unmask();
    s.server.finish()
}

/// Guards the holder's check of each share against its commitment when it arrives (without it,
/// `Weakened::hold_unchecked_shares`, the holder returns the bad share at unmasking and is named
/// for the dealer's lie), and the server's check of a rebuilt seed against the advert (without
/// it, `Weakened::trust_returned_shares`, the dealer is not named).
#[test]
fn e_a_client_that_deals_bad_shares_is_reported_or_named() {
    // A dealer that seals one neighbour a share that does not match its commitment: the
    // neighbour reports it, holds nothing of the dealer, and the sum is still exact.
    let unchecked = with_a_bad_dealer(Weakened { hold_unchecked_shares: true, ..Default::default() });
    let victim = unchecked.victim.clone();
    assert!(unchecked.reported.is_empty() && unchecked.complaints.is_empty(), "nobody reports c002");
    assert!(
        matches!(&unchecked.replies[&victim], Err(SecAggError::Cheater { client, .. }) if *client == victim),
        "unchecked, the honest holder is named for c002's share: {:?}",
        unchecked.replies[&victim]
    );
    assert_eq!(unchecked.unmasked.cheaters.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(), vec![victim]);
    let BadDealer { victim, reported, complaints, replies, unmasked } = with_a_bad_dealer(Weakened::default());
    assert_eq!(reported, vec!["c002".to_string()]);
    assert_eq!(complaints, vec![(victim, "c002".to_string())]);
    assert!(replies.values().all(Result::is_ok), "{replies:?}");
    assert!(unmasked.cheaters.is_empty());

    // A dealer whose shares do not rebuild the seed it committed to: named when its seed is
    // rebuilt (v1 did not compare, and named nobody).
    let v1 = Weakened { trust_returned_shares: true, ..Default::default() };
    assert!(with_a_wrong_seed_commitment(v1).unwrap().cheaters.is_empty(), "v1 names nobody");
    let err = with_a_wrong_seed_commitment(Weakened::default()).unwrap_err();
    assert!(matches!(err, SecAggError::Abort(ref m) if m.contains("c003") && m.contains("cheated")), "{err}");
}

// (f) A bad advert signature.
fn with_a_bad_advert(weakened: Weakened, server_checks: bool) -> Result<Unmasked, SecAggError> {
    let mut s = Session::new(setup(7, 3, 4, 8, 17), 17, weakened);
    let adverts = if server_checks {
        s.adverts[2].signature[0] ^= 1;
        for (i, a) in s.adverts.clone().into_iter().enumerate() {
            let r = s.server.handle_advert(&s.ids[i], a, &TestPki);
            assert_eq!(r.is_err(), i == 2);
        }
        let adverts = s.server.close_adverts().unwrap();
        assert!(adverts.values().flatten().all(|a| a.client != "c002"), "nobody is sent the bad advert");
        adverts
    } else {
        // A lax server passes a bad advert on (here: spoilt on the way): the neighbours cope.
        let mut adverts = s.advertise(&[]);
        for a in adverts.values_mut().flatten().filter(|a| a.client == "c002") {
            a.signature[0] ^= 1;
        }
        adverts
    };
    let mut shared = 0;
    for (id, theirs) in &adverts {
        let i = s.index(id);
        let keys = s.clients[i].handle_adverts(theirs, &TestPki, &mut s.rng)?;
        shared += 1;
        s.server.handle_shares(id, keys).unwrap();
    }
    let inbox = s.server.close_shares()?;
    let mut senders = Vec::new();
    for (id, sealed) in inbox {
        let i = s.index(&id);
        match s.clients[i].handle_shares(&sealed, &s.inputs[i], &TestSigner(id.clone())) {
            Ok(m) => {
                s.server.handle_masked(&id, m, &TestPki).unwrap();
                senders.push(i);
            }
            Err(SecAggError::Abort(_)) => {}
            Err(e) => return Err(e),
        }
    }
    assert!(shared >= 6);
    assert!(!senders.contains(&2), "c002 got no shares from anyone: it does not take part");
    s.confirm_and_unmask();
    let expected = s.expected(senders.iter().copied());
    let unmasked = s.server.finish()?;
    assert_eq!(unmasked.sum, expected);
    Ok(unmasked)
}

#[test]
fn f_a_certificate_problem_leaves_its_sender_out_unnamed_and_a_low_order_key_is_named() {
    let mut s = Session::new(setup(5, 3, 4, 4, 18), 18, Weakened::default());
    // A certificate that is not this client's (expired, another CA's: the same to the server).
    let mut stranger = s.adverts[1].clone();
    stranger.certificate = b"someone else".to_vec();
    let err = s.server.handle_advert("c001", stranger, &TestPki).unwrap_err();
    assert!(matches!(err, SecAggError::Peer(ref m) if m.contains("certificate")), "{err}");
    // A low-order public key, properly signed: no neighbour could agree a key with it.
    let mut weak = s.adverts[2].clone();
    weak.mask_pk = [0; 32];
    let message = advert_message(&s.setup, &s.session, &weak, Weakened::default());
    weak.signature = TestSigner("c002".into()).sign(&message).unwrap();
    let err = s.server.handle_advert("c002", weak, &TestPki).unwrap_err();
    assert!(
        matches!(err, SecAggError::Cheater { ref client, ref what } if client == "c002" && what.contains("low-order"))
    );
    assert_eq!(s.server.cheaters().len(), 1, "the certificate problem named nobody");
    // An advert in another client's name, with an unknown id, is refused with the id escaped.
    let mut forged = s.adverts[3].clone();
    forged.client = "c999\nround complete".into();
    let err = s.server.handle_advert("c003", forged, &TestPki).unwrap_err().to_string();
    assert!(err.contains("c999\\nround complete") && !err.contains('\n'), "{err}");
}

#[test]
fn f_a_bad_advert_signature_leaves_its_sender_out_not_the_round() {
    let v1 = Weakened { abort_on_bad_advert: true, ..Default::default() };
    let err = with_a_bad_advert(v1, false).unwrap_err();
    assert!(
        matches!(err, SecAggError::Server(ref m) if m.contains("does not verify")),
        "v1: its neighbours abort: {err}"
    );
    let unmasked = with_a_bad_advert(Weakened::default(), true).unwrap();
    assert_eq!(unmasked.survivors.len(), 6, "the server names c002 and leaves it out");
    let unmasked = with_a_bad_advert(Weakened::default(), false).unwrap();
    assert_eq!(unmasked.survivors.len(), 6, "past a lax server, each neighbour leaves c002 out");
}

// (g) A rerun of the same setup. Signatures bind the session; if the server alone chose the
// session (v1, or a server nonce), running one setup twice would let it reuse what clients signed
// the first time: an old advert whose mask key it learnt when it called that client dropped, or
// old confirmations of a survivor list, to pass the consistency check with lists the clients of
// this run never agreed on. Each client's fresh nonce in the session id ends that.
fn rerun(weakened: Weakened) -> (bool, bool) {
    let first = {
        let mut s = Session::new(setup(5, 3, 4, 4, 40), 40, weakened);
        s.run_to_masked_inputs();
        let (_, requests) = s.confirm();
        (s.adverts.clone(), requests)
    };
    let mut s = Session::new(setup(5, 3, 4, 4, 40), 41, weakened);
    // An advert of the first run, handed to c000 in the second.
    let mut adverts = s.advertise(&[]);
    let old = first.0[1].clone();
    *adverts.get_mut("c000").unwrap().iter_mut().find(|a| a.client == "c001").unwrap() = old;
    let keys = s.clients[0].handle_adverts(&adverts["c000"], &TestPki, &mut s.rng).unwrap();
    let old_advert_accepted = !keys.refused.contains(&"c001".to_string());
    // Old confirmations in place of this run's, with this run's masking lists.
    let mut s = Session::new(setup(5, 3, 4, 4, 40), 42, weakened);
    s.run_to_masked_inputs();
    let (_, requests) = s.confirm();
    let mut forged = requests["c000"].clone();
    forged.confirmations = first.1["c000"].confirmations.clone();
    let old_confirmations_accepted = s.clients[0].handle_unmask(&forged, &TestPki).is_ok();
    (old_advert_accepted, old_confirmations_accepted)
}

#[test]
fn g_a_rerun_of_the_same_setup_cannot_reuse_what_clients_signed_before() {
    let server_chosen = Weakened { server_chosen_session: true, ..Default::default() };
    assert_eq!(rerun(server_chosen), (true, true), "a session the server alone chooses replays");
    assert_eq!(rerun(Weakened::default()), (false, false), "with the clients' nonces nothing replays");
}

// (h) Withheld shares. The server keeps c005's and c006's shares from c000, c001 and c002, so
// those three mask only among themselves and with c003 and c004; it calls c003 and c004 dropped
// (their keys come back) and shows everybody one list, c000..c002, c005, c006. The masks of
// c000..c002 then cancel or come off, and their sum is read: three inputs, under min_inputs 5.
fn withheld_shares(weakened: Weakened) -> Result<bool, SecAggError> {
    let (n, t) = (7, 4);
    let mut setup = setup(n, t, 6, 6, 43);
    setup.min_inputs = 5;
    let mut s = Session::new(setup, 43, weakened);
    let adverts = s.advertise(&[]);
    s.share(&adverts);
    let mut inbox = s.server.close_shares().unwrap();
    let (group, dropped, withheld) = ([0usize, 1, 2], [3usize, 4], [5usize, 6]);
    for &r in &group {
        let ids = s.ids.clone();
        inbox.get_mut(&ids[r]).unwrap().retain(|sealed| !withheld.iter().any(|&w| sealed.from == ids[w]));
    }
    let masked = s.mask(&inbox);
    let survivors: Vec<usize> = group.iter().chain(&withheld).copied().collect();
    let list = SurvivorList { survivors: survivors.iter().map(|&i| s.ids[i].clone()).collect() };
    let mut confirmations = Vec::new();
    for &i in &survivors {
        let signature = s.clients[i].handle_survivors(&list, &TestSigner(s.ids[i].clone()))?;
        confirmations.push(Confirmation {
            client: s.ids[i].clone(),
            certificate: s.ids[i].as_bytes().to_vec(),
            signature,
        });
    }
    let masking: Vec<MaskingList> = survivors.iter().map(|&i| masked[&s.ids[i]].masking.clone()).collect();
    let mut replies = Vec::new();
    for &i in &survivors {
        let request = UnmaskRequest { confirmations: confirmations.clone(), masking: masking.clone() };
        replies.push((s.ids[i].clone(), s.clients[i].handle_unmask(&request, &TestPki)?));
    }
    let (seeds, keys) = (rebuilt(&replies, t, "seed"), rebuilt(&replies, t, "key"));
    // The group's masked inputs, less their seeds and their masks with the "dropped" pair.
    Ok(group_sum(&s, &group, &masked, &seeds, &keys, &dropped) == Some(s.expected(group)))
}

#[test]
fn h_withheld_shares_cannot_cut_a_small_group_off() {
    let unchecked = Weakened { skip_masking_check: true, ..Default::default() };
    assert_eq!(withheld_shares(unchecked), Ok(true), "without the masking lists the server reads a sum of three");
    let err = withheld_shares(Weakened::default()).unwrap_err();
    assert!(matches!(err, SecAggError::Abort(ref m) if m.contains("did not mask against")), "{err}");
}

// (i) Dropouts that split the graph. Twelve clients of degree 3 (a ring with the opposite client
// as third neighbour); when the server says four of them dropped (truly or not), the survivors
// can fall into parts in which every client still has t surviving neighbours, and each part's
// sum comes out on its own, though the list is long enough. (With an even degree a part's last
// client keeps only k / 2 < t neighbours, so no part can be unmasked; odd degrees need the check.)
fn split_graph(weakened: Weakened) -> Result<bool, SecAggError> {
    let (n, t) = (12, 2);
    let mut setup = setup(n, t, 3, 4, 44);
    setup.min_inputs = 5;
    let mut s = Session::new(setup, 44, weakened);
    // Find four clients whose dropping leaves parts of which every member keeps t neighbours.
    let all: std::collections::BTreeSet<usize> = (0..n).collect();
    let mut split = None;
    'search: for a in 0..n {
        for b in a + 1..n {
            for c in b + 1..n {
                for d in c + 1..n {
                    let survivors: std::collections::BTreeSet<usize> =
                        all.iter().copied().filter(|i| ![a, b, c, d].contains(i)).collect();
                    let keeps_t =
                        survivors.iter().all(|&i| s.graph[i].iter().filter(|j| survivors.contains(j)).count() >= t);
                    let parts = super::graph::part_sizes(&s.graph, &survivors);
                    if keeps_t && parts.len() > 1 {
                        split = Some(([a, b, c, d], survivors, parts));
                        break 'search;
                    }
                }
            }
        }
    }
    let (cut, survivors, parts) = split.expect("a Moebius ladder of 12 splits after four drops");
    assert!(parts.iter().any(|&size| size < 5) && survivors.len() >= 5, "{parts:?}");
    let adverts = s.advertise(&[]);
    s.share(&adverts);
    let inbox = s.server.close_shares().unwrap();
    let masked = s.mask(&inbox);
    for (id, m) in &masked {
        if survivors.contains(&s.index(id)) {
            s.server.handle_masked(id, m.clone(), &TestPki).unwrap();
        }
    }
    let (_, requests) = s.confirm();
    let mut replies = Vec::new();
    for (id, request) in &requests {
        let i = s.index(id);
        replies.push((id.clone(), s.clients[i].handle_unmask(request, &TestPki)?));
    }
    let (seeds, keys) = (rebuilt(&replies, t, "seed"), rebuilt(&replies, t, "key"));
    // One part: a survivor and everyone reachable from it among the survivors.
    let start = *survivors.iter().next().unwrap();
    let mut part = vec![start];
    let mut k = 0;
    while k < part.len() {
        for &j in &s.graph[part[k]] {
            if survivors.contains(&j) && !part.contains(&j) {
                part.push(j);
            }
        }
        k += 1;
    }
    let sum = group_sum(&s, &part, &masked, &seeds, &keys, &cut);
    Ok(part.len() < s.setup.min_inputs && sum == Some(s.expected(part)))
}

#[test]
fn i_a_survivor_graph_in_small_parts_is_not_unmasked() {
    let unchecked = Weakened { skip_masking_check: true, ..Default::default() };
    assert_eq!(split_graph(unchecked), Ok(true), "without the check one part's sum comes out alone");
    let err = split_graph(Weakened::default()).unwrap_err();
    assert!(matches!(err, SecAggError::Abort(ref m) if m.contains("falls apart")), "{err}");
}

// (j) Regional survivor lists (found by an independent review of the neighbourhood-only check).
// A consistency check that counts t confirmations among one's k neighbours holds only within a
// neighbourhood: the server leaves four spread-out clients out before phase 1, shows each region
// of the ring between two of them the list "everyone but the two left out at my ends" (naming
// the far ones as survivors though they sent nothing), and every region confirms its own list.
// Every check passes and the server reads the sum of 44 clients under min_inputs 46. The
// committee's quorum allows one list at most, and no region holds a quorum of it.
fn regional_lists(weakened: Weakened) -> Result<bool, SecAggError> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let (n, k, t) = (48, 8, 5);
    let mut setup = setup(n, t, k, 6, 60);
    setup.min_inputs = 46;
    let mut s = Session::new(setup, 60, weakened);
    // The ring order of the session's graph (as `graph::harary` draws it).
    let mut order: Vec<usize> = (0..n).collect();
    let seed = u64::from_be_bytes(s.session[..8].try_into().unwrap());
    order.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed));
    let out: Vec<usize> = [0usize, 12, 24, 36].iter().map(|&p| order[p]).collect();
    let region = |i: usize| order.iter().position(|&x| x == i).unwrap() / 12;
    let adverts = s.advertise(&out);
    s.share(&adverts);
    let inbox = s.server.close_shares().unwrap();
    let masked = s.mask(&inbox);
    let group: Vec<usize> = (0..n).filter(|i| !out.contains(i)).collect();
    let lists: BTreeMap<usize, Vec<usize>> = group
        .iter()
        .map(|&i| {
            let ends = [out[region(i)], out[(region(i) + 1) % 4]];
            (i, (0..n).filter(|j| !ends.contains(j)).collect())
        })
        .collect();
    let mut signed = BTreeMap::new();
    for (&i, list) in &lists {
        let survivors = SurvivorList { survivors: list.iter().map(|&j| s.ids[j].clone()).collect() };
        signed.insert(i, s.clients[i].handle_survivors(&survivors, &TestSigner(s.ids[i].clone()))?);
    }
    let masking: Vec<MaskingList> = masked.values().map(|m| m.masking.clone()).collect();
    let mut replies = Vec::new();
    for (&i, list) in &lists {
        // Every signature the server holds over this client's list.
        let confirmations = signed
            .iter()
            .filter(|(j, _)| lists[j] == *list)
            .map(|(&j, sig)| Confirmation {
                client: s.ids[j].clone(),
                certificate: s.ids[j].as_bytes().to_vec(),
                signature: sig.clone(),
            })
            .collect();
        let request = UnmaskRequest { confirmations, masking: masking.clone() };
        match s.clients[i].handle_unmask(&request, &TestPki) {
            Ok(reply) => replies.push((s.ids[i].clone(), reply)),
            // The two ends of a region lack t neighbours with their list.
            Err(e) if weakened.neighbourhood_consistency => assert!(e.to_string().contains("confirmed")),
            Err(e) => return Err(e),
        }
    }
    let seeds = rebuilt(&replies, t, "seed");
    Ok(group_sum(&s, &group, &masked, &seeds, &BTreeMap::new(), &[]) == Some(s.expected(group)))
}

#[test]
fn j_regional_survivor_lists_are_refused() {
    let local = Weakened { neighbourhood_consistency: true, ..Default::default() };
    assert_eq!(regional_lists(local), Ok(true), "with a neighbourhood check the server reads 44 inputs under 46");
    let err = regional_lists(Weakened::default()).unwrap_err();
    assert!(matches!(err, SecAggError::Abort(ref m) if m.contains("committee")), "{err}");
}

// (k) One refused advert. A client that refuses a neighbour's advert the server verified (a
// cheater claiming it failed, or an honest client whose clock is off) deals it no shares and
// ignores its shares; neither masks against the other, and every neighbour's masking check would
// then refuse to reveal: one refusal would cost the round (found by the second review). The
// server settles it when routing the shares: the refuser is left out, the round goes on.
// Returns whether the refuser was left out, and the round's sum against the others' inputs.
fn one_refusal(weakened: Weakened) -> (bool, Result<bool, SecAggError>) {
    let mut setup = setup(20, 5, 8, 6, 70);
    setup.min_inputs = 10;
    let mut s = Session::new(setup, 70, weakened);
    let (refuser, refused) = (3usize, s.graph[3][0]);
    let mut adverts = s.advertise(&[]);
    // The refuser's copy of the refused client's advert does not verify (for the refuser only).
    let theirs = adverts.get_mut(&s.ids[refuser]).unwrap();
    theirs.iter_mut().find(|a| a.client == s.ids[refused]).unwrap().signature[0] ^= 1;
    let sent = s.share(&adverts);
    assert_eq!(sent[&s.ids[refuser]].refused, vec![s.ids[refused].clone()]);
    let inbox = s.server.close_shares().unwrap();
    let left_out = !inbox.contains_key(&s.ids[refuser]) && inbox.values().flatten().all(|x| x.from != s.ids[refuser]);
    for (id, m) in s.mask(&inbox) {
        s.server.handle_masked(&id, m, &TestPki).unwrap();
    }
    let (_, requests) = s.confirm();
    let sum = s.unmask(&requests).and_then(|replies| {
        for (id, reply) in replies {
            s.server.handle_unmask(&id, reply)?;
        }
        Ok(s.server.finish()?.sum == s.expected((0..20).filter(|&i| i != refuser)))
    });
    (left_out, sum)
}

/// Guards the server's settling of one-way edges when it routes the shares (without it,
/// `Weakened::route_one_way_edges`, one refusal costs the round).
#[test]
fn k_one_refused_advert_leaves_one_client_out_not_the_round() {
    let (left_out, sum) = one_refusal(Weakened { route_one_way_edges: true, ..Default::default() });
    assert!(!left_out);
    let err = sum.unwrap_err();
    assert!(
        matches!(err, SecAggError::Abort(ref m) if m.contains("did not mask against")),
        "unsettled, the refuser's neighbours refuse to reveal and the round is lost: {err}"
    );
    assert_eq!(one_refusal(Weakened::default()), (true, Ok(true)), "the refuser is left out, the round goes on");
}

// (l) An out-of-range input. Masking hides any residue, so a client may send values outside the
// quantizer's range: v1 applied them, and one client's negative weight made the total tiny and
// the mean huge (found by a third review). The sum of in-range inputs has a known range; a sum
// outside it is not used.
fn out_of_range(weakened: Weakened) -> Result<Vec<u64>, SecAggError> {
    let mut s = Session::new(setup(5, 3, 4, 4, 50), 50, weakened);
    let max = s.setup.params.quantizer.max_code();
    // c002 "encodes" a huge value: its input, well past max_code, masked as any other.
    s.inputs[2] = vec![max * 40, 0, 0, 0];
    s.run_to_masked_inputs();
    assert!(s.confirm_and_unmask().values().all(Result::is_ok));
    let unmasked = s.server.finish()?;
    assert_eq!(unmasked.sum, s.expected(0..5));
    Ok(unmasked.sum)
}

/// Guards the server's range check of the sum (without it, `Weakened::unchecked_sum_range`, the
/// sum with the huge value is used) and the decoder's check of the weight total.
#[test]
fn l_an_out_of_range_input_is_caught_in_the_sum() {
    let max = setup(5, 3, 4, 4, 50).params.quantizer.max_code();
    let sum = out_of_range(Weakened { unchecked_sum_range: true, ..Default::default() }).unwrap();
    assert!(sum[0] > 5 * max, "unchecked, a sum no five in-range inputs give is used: {sum:?}");
    let err = out_of_range(Weakened::default()).unwrap_err();
    assert!(matches!(err, SecAggError::Abort(ref m) if m.contains("outside")), "{err}");
    // Within the range, a weight total no in-range inputs give is refused by the decoder too,
    // and the mean is held to the quantizer's range.
    let q = quantize::Quantizer { bits: 32, clip: 1.0, scale: 1000.0, wrap: false };
    let big_total = vec![q.max_code(), q.max_code(), q.max_code() * 3];
    assert!(weighted_mean_from_sum(&big_total, 2, &[2], &q).is_none(), "a weight total of 4 from two clients");
}

// (m) Colluding clients. The server and c of c000's neighbours pool all they hold: each
// colluder's own keys, the shares c000 dealt it (opened with its own cipher key from the
// ciphertexts the server routed), and what the server obtains in an ordinary round in which c000
// survives: t shares of every survivor's self-mask seed (so c000's seed) and the sum. What then
// hides c000's input in its masked input is its pairwise masks with its honest neighbours, whose
// seeds need c000's mask key (or theirs, whose shares nobody returns while they survive).
// Returns whether the pool's best guess of c000's mask key is the key, and whether c000's input
// comes out.
fn collude(c: usize) -> (bool, bool) {
    let (n, t, target) = (8, 4, 0);
    let mut s = Session::new(setup(n, t, 6, 6, 80), 80, Weakened::default());
    let colluders = s.graph[target][..c].to_vec();
    let (inbox, masked) = s.run_to_masked_inputs();
    let (_, requests) = s.confirm();
    let replies = s.unmask(&requests).unwrap();
    assert!(replies.iter().all(|(_, r)| r.key_shares.is_empty()), "nobody dropped: no key share comes back");
    for (id, reply) in &replies {
        s.server.handle_unmask(id, reply.clone()).unwrap();
    }
    assert_eq!(s.server.finish().unwrap().sum, s.expected(0..n), "an ordinary round");
    let seed = rebuilt(&replies, t, "seed")[&s.ids[target]];
    let (mut key_shares, mut pairwise) = (Vec::new(), Vec::new());
    for &m in &colluders {
        let (cipher, mask) = s.clients[m].own_keys();
        let sealed = inbox[&s.ids[m]].iter().find(|x| x.from == s.ids[target]).unwrap();
        let info = share_key_info(&s.session, target, m, Weakened::default());
        let key = cipher.agree(&s.adverts[target].cipher_pk, &[&info[..]]).unwrap();
        let plain = crypto::open(&key, &share_aad(&s.session, target, m), &sealed.ciphertext).unwrap();
        let ((_, key_share), _): ((Share, Share), usize) =
            bincode::serde::decode_from_slice(&plain, bincode::config::standard()).unwrap();
        key_shares.push(key_share);
        pairwise.push((m, pairwise_seed(&s, &mask, m, target)));
    }
    // The pool interpolates through the shares it holds: that gives the key if it was dealt at a
    // threshold of at most c; t - 1 shares fit every key alike.
    let secret: [u8; 32] = shamir::combine(&key_shares, c).unwrap()[..].try_into().unwrap();
    let key = KeyPair::from_secret(&secret);
    for &m in s.graph[target].iter().filter(|m| !colluders.contains(m)) {
        pairwise.push((m, pairwise_seed(&s, &key, target, m)));
    }
    let input = strip_masks(&s, target, &masked[&s.ids[target]].values, &seed, &pairwise);
    (key.public() == s.adverts[target].mask_pk, input == s.inputs[target])
}

/// Guards the threshold of the sharing of a client's mask key, with a survivor's neighbours
/// returning only its seed share: t - 1 colluding neighbours and the server learn nothing of its
/// input, and one more colluder (t) reads it. (Dealing the key at threshold t - 1 makes the
/// first half fail.)
#[test]
fn m_fewer_than_t_colluding_neighbours_cannot_read_a_survivors_input() {
    assert_eq!(collude(3), (false, false), "t - 1 = 3 colluders and the server do not get c000's mask key or input");
    assert_eq!(collude(4), (true, true), "t = 4 colluders rebuild c000's mask key and read its input");
}

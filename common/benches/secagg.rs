//! Secure-aggregation throughput on one core: mask expansion (the PRG) and the server's unmask
//! and sum; and the protocol's tolerance of random dropouts (how many sessions complete).
//! `cargo bench -p cohort-common --bench secagg`.

use std::collections::BTreeSet;
use std::time::Instant;

use aes::cipher::{KeyIvInit, StreamCipher};
use cohort_common::secagg::crypto::apply_mask;
use rand::{Rng, SeedableRng};

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let n = 1 << 24; // 16 Mi u32 = 64 MiB of mask
    let mut v = vec![0u64; n];
    let secs = best_of(5, || apply_mask(&mut v, &[7u8; 32], 32, true));
    println!(
        "apply_mask (AES-128-CTR), expansion + add mod 2^32: {:.2} GB/s of mask per core",
        (n * 4) as f64 / secs / 1e9
    );

    let mut bytes = vec![0u8; n * 4];
    let secs = best_of(5, || {
        let mut prg = rand_chacha::ChaCha20Rng::from_seed([7u8; 32]);
        prg.fill(&mut bytes[..]);
    });
    println!("PRG ChaCha20 (rand_chacha), keystream only:       {:.2} GB/s per core", bytes.len() as f64 / secs / 1e9);

    type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;
    let secs = best_of(5, || {
        bytes.iter_mut().for_each(|b| *b = 0);
        let mut c = Aes128Ctr::new(&[7u8; 16].into(), &[0u8; 16].into());
        c.apply_keystream(&mut bytes);
    });
    println!(
        "PRG AES-128-CTR (RustCrypto aes + ctr), keystream: {:.2} GB/s per core (incl. zeroing)",
        bytes.len() as f64 / secs / 1e9
    );

    // The server's unmask + sum for a cohort of 10 and 100,000-value vectors, no dropouts.
    use cohort_common::secagg::quantize::Quantizer;
    use cohort_common::secagg::*;
    for (clients, len) in [(10usize, 100_000usize), (10, 199_211)] {
        let setup = SecAggSetup {
            round: 1,
            purpose: "train".into(),
            params: SecAggParams {
                threshold: 5,
                degree: 8,
                dropout_tolerance: 0.3,
                quantizer: Quantizer { bits: 32, clip: 4.0, scale: 1e6, wrap: false },
            },
            cohort: (0..clients).map(|i| format!("c{i:03}")).collect(),
            vector_len: len,
            min_inputs: 3,
        };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut server = SecAggServer::new(setup.clone()).unwrap();
        let signer = NoCert;
        let mut cs = Vec::new();
        for id in &setup.cohort {
            let (c, nonce) = SecAggClient::join(id, setup.clone(), &mut rng).unwrap();
            server.handle_join(id, nonce).unwrap();
            cs.push(c);
        }
        let joined = server.close_joins().unwrap();
        for (c, id) in cs.iter_mut().zip(&setup.cohort) {
            let a = c.handle_joined(&joined, &signer, &mut rng).unwrap();
            server.handle_advert(id, a, &NoCert).unwrap();
        }
        for (id, theirs) in server.close_adverts().unwrap() {
            let i = setup.cohort.binary_search(&id).unwrap();
            let sealed = cs[i].handle_adverts(&theirs, &NoCert, &mut rng).unwrap();
            server.handle_shares(&id, sealed).unwrap();
        }
        let inbox = server.close_shares().unwrap();
        let input: Vec<u64> = (0..len).map(|_| rng.random_range(0..1000)).collect();
        let t = Instant::now();
        let mut masked = Vec::new();
        for (id, sealed) in &inbox {
            let i = setup.cohort.binary_search(id).unwrap();
            masked.push((id.clone(), cs[i].handle_shares(sealed, &input, &NoCert).unwrap()));
        }
        let client_secs = t.elapsed().as_secs_f64() / clients as f64;
        let t = Instant::now();
        for (id, m) in masked {
            server.handle_masked(&id, m, &NoCert).unwrap();
        }
        let list = server.close_masked().unwrap();
        for (i, id) in setup.cohort.iter().enumerate() {
            let signature = cs[i].handle_survivors(&list, &NoCert).unwrap();
            server.handle_confirmation(id, signature, &NoCert).unwrap();
        }
        for (id, request) in server.close_confirmations().unwrap() {
            let i = setup.cohort.binary_search(&id).unwrap();
            let reply = cs[i].handle_unmask(&request, &NoCert).unwrap();
            server.handle_unmask(&id, reply).unwrap();
        }
        let _sum = server.finish().unwrap();
        let server_secs = t.elapsed().as_secs_f64();
        let _ = BTreeSet::<u8>::new();
        println!(
            "{clients} clients x {len} values: client masking {:.1} ms each; server sum + unmask {:.1} ms ({:.0} M values/s)",
            client_secs * 1e3,
            server_secs * 1e3,
            (clients * len) as f64 / server_secs / 1e6
        );
    }
    dropout_tolerance();
}

/// How many of 400 sessions complete when each client crashes, with probability `rate`, before a
/// random one of its six messages (join, advert, shares, masked input, confirmation, unmask
/// reply). The same account of who gets how far as the socket-free harness
/// (`common/src/secagg/harness.rs`, `run`), without the cryptography: it asks only whether the
/// survivors' secrets can be rebuilt and every check passes.
fn dropout_tolerance() {
    use cohort_common::secagg::graph::part_sizes;
    use cohort_common::secagg::quantize::Quantizer;
    use cohort_common::secagg::{SecAggParams, SecAggSetup};
    println!("sessions completed of 400, clients crashing at a random phase (min_inputs = n / 2):");
    for (n, k, t, rate) in [
        (10, 8, 5, 0.3),
        (100, 8, 5, 0.05),
        (100, 8, 5, 0.1),
        (100, 8, 5, 0.2),
        (100, 8, 5, 0.3),
        (100, 20, 11, 0.2),
        (100, 20, 11, 0.3),
    ] {
        let setup = SecAggSetup {
            round: 1,
            purpose: "train".into(),
            params: SecAggParams {
                threshold: t,
                degree: k,
                dropout_tolerance: 0.0,
                quantizer: Quantizer { bits: 32, clip: 1.0, scale: 1.0, wrap: false },
            },
            cohort: (0..n).map(|i| format!("c{i:03}")).collect(),
            vector_len: 1,
            min_inputs: n / 2,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut completed = 0;
        for _ in 0..400 {
            let session: [u8; 32] = rng.random();
            let graph = setup.neighbours(&session);
            // Each client's first message not sent (6: it sent them all).
            let crash: Vec<usize> =
                (0..n).map(|_| if rng.random::<f64>() < rate { rng.random_range(0..6) } else { 6 }).collect();
            let count = |i: usize, set: &BTreeSet<usize>| graph[i].iter().filter(|j| set.contains(j)).count();
            let after = |phase: usize, from: &BTreeSet<usize>, needs_t: bool| -> BTreeSet<usize> {
                from.iter().copied().filter(|&i| crash[i] > phase && (!needs_t || count(i, from) >= t)).collect()
            };
            let joined = after(0, &(0..n).collect(), false);
            let advertised = after(1, &joined, false);
            let shared = after(2, &advertised, true);
            let masked = after(3, &shared, true);
            let confirmed = after(4, &masked, false);
            let revealing = after(5, &confirmed, false);
            let committee = setup.committee(&session);
            let quorum = committee.iter().filter(|c| confirmed.contains(c)).count() >= setup.quorum(committee.len());
            let ok = joined.len() > t
                && advertised.len() > t
                && shared.len() > t
                && masked.len() >= t.max(setup.min_inputs)
                && quorum
                && part_sizes(&graph, &masked).iter().all(|&size| size >= setup.min_inputs)
                && shared.iter().all(|&j| count(j, &revealing) >= t);
            completed += usize::from(ok);
        }
        println!("  n {n:>3}, degree {k:>2}, threshold {t:>2}, {:>3.0}% crash: {completed:>3}", rate * 100.0);
    }
}

struct NoCert;
impl cohort_common::secagg::AdvertSigner for NoCert {
    fn certificate(&self) -> Vec<u8> {
        Vec::new()
    }
    fn sign(&self, _: &[u8]) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
}
impl cohort_common::secagg::PeerVerifier for NoCert {
    fn verify(&self, _: &str, _: &[u8], _: &[u8], _: &[u8]) -> Result<(), cohort_common::secagg::Rejection> {
        Ok(())
    }
    fn verify_signature(&self, _: &[u8], _: &[u8], _: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

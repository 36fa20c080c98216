//! Secure-aggregation throughput on one core: mask expansion (the PRG) and the server's unmask
//! and sum. `cargo bench -p cohort-common --bench secagg`.

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

//! Clipping and differential privacy over real QUIC with secure aggregation: the global model
//! is the mean of the clipped updates; a client whose own budget runs out declines and the
//! rounds go on without it; the server stops before the round that would pass its budget.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::support::*;
use candle_core::Device;
use cohort::client::ledger::LedgerFile;
use cohort::common::dp::Accounting;
use cohort::common::dp::{clip_l2, default_orders, RdpAccountant};
use cohort::common::model::{flat_from_safetensors, Model};
use cohort::common::trainer::Trainer;
use cohort::server::config::{Collection, DpConfig, Federation, SecAggConfig};
use cohort::server::store::Store;

fn private_federation(rounds: u64, clients: usize, min: usize, clip: f64, z: f64) -> Federation {
    let mut fed = federation(rounds, clients, min);
    fed.collection = Collection::Secure;
    fed.secagg = SecAggConfig { degree: 3, threshold: Some(2), ..Default::default() };
    fed.secagg.phase_timeout_secs = 10.0;
    fed.round_timeout_secs = 30.0;
    fed.dp = Some(DpConfig {
        clip,
        noise_multiplier: z,
        per_segment: false,
        delta: 1e-5,
        epsilon_budget: None,
        count_noise: None,
        adaptive: None,
    });
    fed
}

/// Epsilon after `rounds` rounds of the Gaussian mechanism with every client sampled (q = 1).
fn epsilon(rounds: u64, z: f64) -> f64 {
    let mut acc = RdpAccountant::new(default_orders()).unwrap();
    acc.compose(1.0, z, rounds);
    acc.epsilon(1e-5).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_model_moves_by_the_mean_of_the_clipped_updates() {
    logs();
    let ca = Ca::new();
    let sizes = [(1u64, 30usize), (2, 60), (3, 90)];
    // The clients' updates, computed here first, choose a clip norm that clips two of three.
    let (initial, plan) = first_plan(&federation(1, 3, 3));
    let deltas: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&(i, n)| {
            let mut p = Trainer::new(format!("client-{i}"), Arc::new(dataset(n, i)), Device::Cpu);
            p.train(&plan).unwrap().delta.to_f32().unwrap()
        })
        .collect();
    let mut norms: Vec<f64> =
        deltas.iter().map(|d| d.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()).collect();
    norms.sort_by(f64::total_cmp);
    let clip = (norms[0] + norms[1]) / 2.0;

    let mut fed = private_federation(1, 3, 3, clip, 0.0);
    fed.secagg.degree = 2;
    fed.secagg.dropout_tolerance = Some(0.0);
    let mut server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed, None);
    let clients = start_sized_clients(&ca, server.addr, &sizes);
    let report = next_report(&mut server, 60).await;
    assert!(report.completed && report.participants == 3, "{report:?}");
    assert_eq!(report.clip, Some(clip));
    let unclipped = report.unclipped.unwrap();
    assert!((unclipped - 1.0 / 3.0).abs() < 1e-3, "one update of three was under the clip norm: {unclipped}");
    assert!(report.epsilon.is_none(), "clipping without noise claims no epsilon");

    // Uniform weights: the mean of the clipped updates, whatever the sample counts.
    let mut expected: Vec<f64> = initial.iter().map(|v| *v as f64).collect();
    for delta in &deltas {
        let mut clipped = delta.clone();
        clip_l2(&mut clipped, clip);
        expected.iter_mut().zip(&clipped).for_each(|(e, d)| *e += *d as f64 / 3.0);
    }
    let checkpoint = std::fs::read(ca.state.checkpoint(1)).unwrap();
    let global = flat_from_safetensors(Model::new(&spec(), &Device::Cpu, 0).unwrap().layout(), &checkpoint).unwrap();
    let worst = global.iter().zip(&expected).map(|(g, e)| (*g as f64 - e).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-5, "global model differs from the mean of the clipped updates by {worst}");

    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_out_of_budget_declines_and_the_server_stops_at_its_own() {
    logs();
    let ca = Ca::new();
    let z = 1.0;
    let mut fed = private_federation(6, 4, 3, 1.0, z);
    // The server's budget allows three rounds; client-1's own allows one.
    fed.dp.as_mut().unwrap().epsilon_budget = Some((epsilon(3, z) + epsilon(4, z)) / 2.0);
    let client_budget = (epsilon(1, z) + epsilon(2, z)) / 2.0;
    let mut server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed, None);
    let ledger_dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Mutex::new(
        LedgerFile::open(ledger_dir.path(), client_budget, 1e-5, Accounting::Participations).unwrap(),
    ));
    let mut clients = vec![start_private_client(ca.client("client-1"), server.addr, dataset(40, 1), ledger.clone())];
    clients.extend(start_sized_clients(&ca, server.addr, &[(2, 40), (3, 40), (4, 40)]));

    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(next_report(&mut server, 60).await);
    }
    assert!(reports.iter().all(|r| r.completed), "{reports:?}");
    assert_eq!(reports[0].participants, 4);
    for r in &reports[1..] {
        assert_eq!(r.participants, 3, "round {} goes on without client-1: {r:?}", r.round);
        let (who, why) = &r.dropped[0];
        assert!(who == "client-1" && why.contains("declined") && why.contains("budget"), "{why}");
    }
    let all = server.task.await.unwrap().unwrap();
    assert_eq!(all.len(), 3, "the server stops before the fourth round would pass its budget");

    // Epsilon as an independent accountant gives it, recorded per round.
    let rows = Store::open(&ca.state.database()).unwrap().rounds().unwrap();
    for row in &rows {
        let expected = epsilon(row.round, z);
        assert!((row.epsilon.unwrap() - expected).abs() < 1e-9, "round {}: {:?} vs {expected}", row.round, row.epsilon);
        assert_eq!((row.sampling_rate, row.noise_multiplier), (Some(1.0), Some(z)));
    }
    let spent = ledger.lock().unwrap().ledger().clone();
    assert!(spent.exhausted && spent.epsilon() <= client_budget);
    assert!((spent.epsilon() - epsilon(1, z)).abs() < 1e-9, "client-1 spent one round");
    let reopened = LedgerFile::open(ledger_dir.path(), client_budget, 1e-5, Accounting::Participations).unwrap();
    assert!(reopened.ledger().exhausted, "the ledger on disk remembers");
    RunningClient::stop_all(clients).await;
}

/// Who was sent a plan, by round.
type Sampled = BTreeMap<u64, BTreeSet<String>>;

/// One run of a private federation of 8 clients at q = 0.75 for 5 rounds: who was sent a plan in
/// each round, each client's ledger, and the federation key the server gave.
async fn sampled_run(seed: u64) -> (Sampled, Vec<LedgerFile>, String, Ca) {
    let ca = Ca::new();
    let mut fed = private_federation(5, 6, 4, 1.0, 1.0);
    fed.seed = seed;
    fed.start_after_clients = Some(8);
    fed.secagg = SecAggConfig { degree: 4, threshold: Some(3), dropout_tolerance: Some(0.0), ..Default::default() };
    fed.secagg.phase_timeout_secs = 10.0;
    let mut server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed, None);
    let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
    let ledgers: Vec<_> = dirs
        .iter()
        .map(|d| Arc::new(Mutex::new(LedgerFile::open(d.path(), 100.0, 1e-5, Accounting::Participations).unwrap())))
        .collect();
    let mut clients: Vec<RunningClient> = (0..8)
        .map(|i| {
            start_private_client(
                ca.client(&format!("client-{i}")),
                server.addr,
                dataset(20, i),
                ledgers[i as usize].clone(),
            )
        })
        .collect();
    for _ in 0..5 {
        next_report(&mut server, 60).await;
    }
    server.task.await.unwrap().unwrap();
    // By round number: an aborted round (too small a sample) keeps its number but does not
    // count toward the five.
    let mut sampled: Sampled = BTreeMap::new();
    for (i, c) in clients.iter_mut().enumerate() {
        while let Ok(event) = c.events.try_recv() {
            if let cohort::client::daemon::ClientEvent::PlanReceived { round } = event {
                sampled.entry(round).or_default().insert(format!("client-{i}"));
            }
        }
    }
    RunningClient::stop_all(clients).await;
    let federation = Store::open(&ca.state.database()).unwrap().federation_id(|| unreachable!()).unwrap();
    let files =
        dirs.iter().map(|d| LedgerFile::open(d.path(), 100.0, 1e-5, Accounting::Participations).unwrap()).collect();
    drop(dirs);
    (sampled, files, federation, ca)
}

/// Attack: replay the server's cohort draws. Protocol v1 seeded them from the federation seed,
/// which any client recovered from one plan. Now the same federation, seed and clients, run
/// twice, sample differently, and v1's replay does not give the cohorts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_cohorts_cannot_be_recomputed_and_ledgers_charge_each_participation() {
    use cohort::common::dp::{federation_key, run_key};
    use cohort::common::round::poisson_cohort;
    use cohort::server::config::DEFAULT_RUN;
    use rand::SeedableRng;
    logs();
    let seed = 42;
    let (first, ledgers, federation, ca) = sampled_run(seed).await;
    let (second, _, _, _) = sampled_run(seed).await;
    assert!(first.values().any(|s| !s.is_empty()), "some rounds ran: {first:?}");
    assert_ne!(first, second, "the same seed and clients gave the same five cohorts");
    let ids: Vec<String> = (0..8).map(|i| format!("client-{i}")).collect();
    let v1_replay = |round: u64| -> std::collections::BTreeSet<String> {
        let v1_seed = seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        poisson_cohort(&ids, 0.75, &mut rand_chacha::ChaCha8Rng::seed_from_u64(v1_seed)).into_iter().collect()
    };
    assert!(!first.iter().all(|(&r, s)| *s == v1_replay(r)), "v1's seeded draw predicts the cohorts");

    // Each client's ledger charged exactly its participations, unamplified, in this federation.
    let identity = ca.client("client-0");
    // One account per run: round numbers start again in each run of a federation.
    let key = run_key(&federation_key(&identity.ca_fingerprint(), &federation), DEFAULT_RUN);
    for (i, ledger) in ledgers.iter().enumerate() {
        let k = first.values().filter(|s| s.contains(&format!("client-{i}"))).count() as u64;
        let ledger = ledger.ledger();
        assert_eq!(ledger.rounds_charged(), k, "client-{i}");
        assert!(
            (ledger.epsilon() - epsilon(k, 1.0)).abs() < 1e-9,
            "client-{i}: {} vs {}",
            ledger.epsilon(),
            epsilon(k, 1.0)
        );
        assert!(ledger.spent.iter().all(|s| s.federation == key), "{:?}", ledger.spent);
    }
    // The server's epsilon against itself is the most-sampled client's.
    let most = (0..8).map(|i| first.values().filter(|s| s.contains(&format!("client-{i}"))).count()).max().unwrap();
    let rows = Store::open(&ca.state.database()).unwrap().rounds().unwrap();
    let last = rows.iter().rev().find_map(|r| r.epsilon_server).unwrap();
    assert!((last - epsilon(most as u64, 1.0)).abs() < 1e-9, "{last} vs {}", epsilon(most as u64, 1.0));
    assert!(rows.iter().all(|r| r.sampling_rate == Some(0.75) && r.too_few_probability.is_some()));
}

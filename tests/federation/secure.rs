//! Secure aggregation over real QUIC: 10 clients, one crashes after sharing its keys and one
//! after sending its masked input; the new global model is the weighted average of the updates
//! the sum includes, within the quantization bound, and the server never saw one of them.

use std::sync::Arc;

use crate::support::*;
use candle_core::Device;
use cohort::client::daemon::{FaultHook, Step};
use cohort::common::model::{flat_from_safetensors, Model};
use cohort::common::secagg::Phase;
use cohort::common::trainer::Trainer;
use cohort::server::config::{Collection, SecAggConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_two_crash_mid_round_and_the_sum_is_exact() {
    logs();
    let ca = Ca::new();
    let mut fed = federation(1, 10, 5);
    fed.collection = Collection::Secure;
    fed.secagg = SecAggConfig {
        degree: 8,
        threshold: Some(5),
        dropout_tolerance: Some(0.3),
        sample_cap: 100,
        ..Default::default()
    };
    fed.round_timeout_secs = 30.0;
    fed.secagg.phase_timeout_secs = 10.0;
    let mut server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed.clone(), Some(dataset(300, 77)));

    let sizes: Vec<(usize, usize)> = (0..10).map(|i| (i, 20 + 10 * i)).collect();
    let crash_at = |step: Step| -> FaultHook { Arc::new(move |round, s| round == 1 && s == step) };
    let clients: Vec<RunningClient> = sizes
        .iter()
        .map(|&(i, n)| {
            let fault = match i {
                3 => Some(crash_at(Step::Secure(Phase::ShareKeys))),
                7 => Some(crash_at(Step::Secure(Phase::MaskedInput))),
                _ => None,
            };
            start_client_with(ca.client(&format!("client-{i}")), server.addr, dataset(n, i as u64), fault)
        })
        .collect();

    let report = next_report(&mut server, 90).await;
    assert!(report.completed, "{report:?}");
    let dropped: Vec<&str> = report.dropped.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(dropped, vec!["client-3"], "{:?}", report.dropped);
    assert_eq!(report.participants, 9, "client-7's masked input is in the sum though it left before unmasking");
    assert!(report.train_loss.is_none(), "a secure round reveals no client's loss");

    // The same round computed here: the weighted mean of the nine included updates.
    let (initial, plan) = first_plan(&fed);
    let mut numerator = vec![0f64; initial.len()];
    let mut total = 0f64;
    for &(i, n) in sizes.iter().filter(|(i, _)| *i != 3) {
        let mut p = Trainer::new(format!("client-{i}"), Arc::new(dataset(n, i as u64)), Device::Cpu);
        let delta = p.train(&plan).unwrap().delta.to_f32().unwrap();
        let w = (n as f64 / 100.0).min(1.0);
        total += w;
        for (acc, d) in numerator.iter_mut().zip(&delta) {
            *acc += w * *d as f64;
        }
    }
    let expected: Vec<f64> = initial.iter().zip(&numerator).map(|(g, s)| *g as f64 + s / total).collect();
    let checkpoint = std::fs::read(ca.state.checkpoint(1)).unwrap();
    let model = Model::new(&spec(), &Device::Cpu, 0).unwrap();
    let global = flat_from_safetensors(model.layout(), &checkpoint).unwrap();
    let worst = global.iter().zip(&expected).map(|(g, e)| (*g as f64 - e).abs()).fold(0f64, f64::max);
    // Quantization: 10 values per coordinate, each off by at most 1/scale (scale ~ 2.7e7),
    // divided by the total weight (~5), plus f32 rounding of the model.
    assert!(worst < 1e-5, "global model differs from the weighted average by {worst}");
    assert!(initial.iter().zip(&global).any(|(a, b)| a != b), "the model moved");

    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
}

/// The weighted mean update of `sizes` (client index, examples) for `plan`, sample cap 100.
fn weighted_mean(plan: &cohort::common::wire::RoundPlan, sizes: &[(usize, usize)]) -> Vec<f64> {
    let mut numerator = vec![0f64; plan.params.len()];
    let mut total = 0f64;
    for &(i, n) in sizes {
        let mut p = Trainer::new(format!("client-{i}"), Arc::new(dataset(n, i as u64)), Device::Cpu);
        let delta = p.train(plan).unwrap().delta.to_f32().unwrap();
        let w = (n as f64 / 100.0).min(1.0);
        total += w;
        numerator.iter_mut().zip(&delta).for_each(|(acc, d)| *acc += w * *d as f64);
    }
    numerator.iter().map(|s| s / total).collect()
}

fn checkpoint(ca: &Ca, round: u64) -> Vec<f32> {
    let bytes = std::fs::read(ca.state.checkpoint(round)).unwrap();
    flat_from_safetensors(Model::new(&spec(), &Device::Cpu, 0).unwrap().layout(), &bytes).unwrap()
}

fn worst(global: &[f32], start: &[f32], mean: &[f64]) -> f64 {
    global.iter().zip(start).zip(mean).map(|((g, s), m)| (*g as f64 - (*s as f64 + m)).abs()).fold(0f64, f64::max)
}

/// A client that returns a corrupt self-mask share in the unmask phase is named as a cheater;
/// its share is not used, the round's sum is exact (its own update, sent before it cheated, is
/// in it: removing it would need both kinds of its shares), and from the next round on it is
/// left out, the sum exact over the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_returning_a_corrupt_share_is_named_excluded_and_the_sums_stay_exact() {
    use cohort::client::daemon::TamperHook;
    use cohort::common::wire::ClientMsg;
    logs();
    let ca = Ca::new();
    let mut fed = federation(2, 7, 5);
    fed.collection = Collection::Secure;
    fed.secagg = SecAggConfig {
        degree: 4,
        threshold: Some(3),
        dropout_tolerance: Some(0.25),
        sample_cap: 100,
        ..Default::default()
    };
    fed.round_timeout_secs = 30.0;
    fed.secagg.phase_timeout_secs = 10.0;
    let mut server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed.clone(), None);
    let sizes: Vec<(usize, usize)> = (0..7).map(|i| (i, 30 + 10 * i)).collect();
    let tamper: TamperHook = Arc::new(|_, reply: &mut ClientMsg| {
        if let ClientMsg::Unmask { reply, .. } = reply {
            if let Some((_, share)) = reply.seed_shares.first_mut() {
                share.y[0] ^= 0x5a;
            }
        }
    });
    let clients: Vec<RunningClient> = sizes
        .iter()
        .map(|&(i, n)| {
            let identity = ca.client(&format!("client-{i}"));
            match i {
                3 => start_cheating_client(identity, server.addr, dataset(n, i as u64), tamper.clone()),
                _ => start_client(identity, server.addr, dataset(n, i as u64)),
            }
        })
        .collect();

    let first = next_report(&mut server, 90).await;
    assert!(first.completed, "{first:?}");
    assert_eq!(first.participants, 7);
    assert_eq!(first.cheaters.len(), 1, "{:?}", first.cheaters);
    assert_eq!(first.cheaters[0].0, "client-3");
    assert!(first.cheaters[0].1.contains("does not match the commitment"), "{}", first.cheaters[0].1);
    let (initial, plan) = first_plan(&fed);
    let after_first = checkpoint(&ca, 1);
    let error = worst(&after_first, &initial, &weighted_mean(&plan, &sizes));
    assert!(error < 1e-5, "round 1 differs from the weighted mean of the seven updates by {error}");

    let second = next_report(&mut server, 90).await;
    assert!(second.completed, "{second:?}");
    assert_eq!((second.cohort, second.participants), (6, 6), "client-3 is not sampled again");
    assert!(second.cheaters.is_empty());
    let mut plan = plan;
    plan.round = 2;
    let seed = cohort::common::round::run_seed(fed.seed, cohort::server::config::DEFAULT_RUN);
    plan.seed = cohort::common::round::plan_seed(seed, 2);
    plan.params = cohort::common::wire::TensorBytes::from_f32(&after_first);
    let others: Vec<(usize, usize)> = sizes.iter().copied().filter(|(i, _)| *i != 3).collect();
    let error = worst(&checkpoint(&ca, 2), &after_first, &weighted_mean(&plan, &others));
    assert!(error < 1e-5, "round 2 differs from the weighted mean of the six others by {error}");

    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
}
